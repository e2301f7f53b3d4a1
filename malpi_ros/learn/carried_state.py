"""Training with the LSTM state carried across batches (truncated BPTT), and scoring that way.

The robot never resets its LSTM between decisions: after minutes of driving its state is far
from the zero state every training window of the seed's recipe starts from, and memory learned
on such windows held only within a window's length of a reset (DESIGN §4). Here each batch row
is a lane through an episode (``pipeline.ChunkSource``): the state a chunk ends with starts the
lane's next chunk, so training sees the states the robot will reach; the gradient stops at
chunk boundaries.

``CarriedStateTrainer`` wraps ``model.build_carried_model`` (the sequence model's own layers)
and keeps the state of each lane in non-trainable variables, one set for training and one for
validation; a batch's ``reset`` flags zero a lane before it runs. Under a ``tf.distribute``
strategy (``learn.distribute``) the variables are replica-local (``on_read``): each replica
holds the state of its own lanes, which its input always brings back to it. Keras' ``fit``,
callbacks and history work unchanged: the logs are ``loss`` and ``accuracy`` (weighted:
burn-in steps and padding do not count), ``val_`` ones for validation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from malpi_ros.config import ModelConfig, PreprocessConfig
from malpi_ros.learn.dataset import Episode
from malpi_ros.learn.distribute import ReplicaFit, replica_logs
from malpi_ros.learn.model import SEQUENCE_INPUT, build_carried_model
from malpi_ros.runtime.image import normalize


class CarriedStateTrainer(ReplicaFit, keras.Model):
    """Fits ``sequence_model`` on ``((x, reset), y, sample_weight)`` batches of ``lanes`` rows
    (a replica's lanes under a strategy), the LSTM state carried from each batch to the next
    (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, sequence_model: keras.Model, lanes: int) -> None:
        super().__init__(name='carried_state_trainer')
        self.net = build_carried_model(cfg, sequence_model)
        self.lanes = lanes
        shape = (lanes, cfg.lstm_units)
        self.state = {
            (phase, part): keras.Variable(
                np.zeros(shape, np.float32),
                trainable=False,
                # Each replica its own lanes' state; saved and read as the first replica's.
                synchronization='on_read',
                aggregation='only_first_replica',
                name=f'{phase}_{part}',
            )
            for phase in ('train', 'val')
            for part in ('h', 'c')
        }
        self.built = True  # every weight exists now (save and restore need it)
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction=None)
        self.loss_tracker = keras.metrics.Mean(name='loss')
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name='accuracy')

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        return [self.loss_tracker, self.accuracy]

    def _run(self, data: Any, phase: str, training: bool) -> tuple[Any, Any, Any, Any]:
        (x, reset), y, weight = data
        keep = 1.0 - tf.reshape(reset, (-1, 1))
        h = self.state[phase, 'h'] * keep
        c = self.state[phase, 'c'] * keep
        out = self.net({SEQUENCE_INPUT: x, 'h': h, 'c': c}, training=training)
        # Keras' own convention ('sum_over_batch_size'): the mean over all B*T steps.
        loss = tf.reduce_mean(self.loss_fn(y, out['probs']) * weight)
        return out, loss, y, weight

    def _finish(self, phase: str, out: Any, loss: Any, y: Any, weight: Any) -> dict[str, Any]:
        self.state[phase, 'h'].assign(tf.stop_gradient(out['h_next']))
        self.state[phase, 'c'].assign(tf.stop_gradient(out['c_next']))
        self.loss_tracker.update_state(loss)
        self.accuracy.update_state(y, out['probs'], sample_weight=weight)
        return replica_logs({m.name: m.result() for m in self.metrics})

    def train_step(self, data: Any) -> dict[str, Any]:
        with tf.GradientTape() as tape:
            out, loss, y, weight = self._run(data, 'train', training=True)
            # The optimizer sums the replicas' gradients: each brings its share of the mean.
            share = loss / tf.distribute.get_replica_context().num_replicas_in_sync
        variables = self.net.trainable_variables
        self.optimizer.apply(tape.gradient(share, variables), variables)
        return self._finish('train', out, loss, y, weight)

    def test_step(self, data: Any) -> dict[str, Any]:
        return self._finish('val', *self._run(data, 'val', training=False))

    def call(self, inputs: Any, training: bool = False) -> Any:
        return self.net(inputs, training=training)


def over_chunks(
    step: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[Any, np.ndarray, np.ndarray]],
    episode: Episode,
    preprocess: PreprocessConfig,
    units: int,
    chunk: int = 256,
) -> list[Any]:
    """``step(x, h, c) -> (result, h_next, c_next)`` over the episode's frames, ``chunk`` at
    a time (``x`` normalized, (1, T, H, W, C)), the state carried from zero at its start (the
    robot's way) so long episodes fit in memory; the results in order."""
    h = np.zeros((1, units), np.float32)
    c = np.zeros((1, units), np.float32)
    results = []
    for start in range(0, len(episode), chunk):
        x = normalize(episode.frames[start : start + chunk], preprocess)[None]
        result, h, c = step(x, h, c)
        results.append(result)
    return results


# Input per call of ``predict_episodes`` at most (float32 frames): 72 rows of 256 frames of
# 30x40x3, 6 rows of 120x120x3.
PREDICT_BYTES = 256 * 2**20


def predict_episodes(
    net: keras.Model,
    episodes: Sequence[Episode],
    preprocess: PreprocessConfig,
    units: int,
    chunk: int = 256,
) -> list[np.ndarray]:
    """Argmax actions of every frame of each episode, the state carried from zero at its
    start (the robot's way), ``chunk`` frames a call. ``net`` is
    ``model.build_carried_model``'s.

    Episodes run side by side, as many rows a call as ``PREDICT_BYTES`` allows, those of
    similar length together: one call per episode made scoring 800 short drives take minutes.
    A row shorter than the group's longest is padded at its end, which no earlier output
    depends on (the LSTM is causal), and the padding's outputs are dropped."""
    out: list[np.ndarray] = [np.zeros(0, np.int64) for _ in episodes]
    order = sorted((i for i, e in enumerate(episodes) if len(e)), key=lambda i: len(episodes[i]))
    if not order:
        return out
    shape = episodes[order[0]].frames.shape[1:]
    rows = max(1, PREDICT_BYTES // (chunk * 4 * int(np.prod(shape))))
    for at in range(0, len(order), rows):
        group = order[at : at + rows]
        longest = len(episodes[group[-1]])
        h = np.zeros((len(group), units), np.float32)
        c = np.zeros((len(group), units), np.float32)
        actions = np.zeros((len(group), longest), np.int64)
        for start in range(0, longest, chunk):
            x = np.zeros((len(group), min(chunk, longest - start), *shape), np.float32)
            for row, i in enumerate(group):
                frames = episodes[i].frames[start : start + len(x[row])]
                normalize(frames, preprocess, out=x[row, : len(frames)])
            result = net({SEQUENCE_INPUT: x, 'h': h, 'c': c}, training=False)
            actions[:, start : start + x.shape[1]] = np.argmax(np.asarray(result['probs']), -1)
            h, c = np.asarray(result['h_next']), np.asarray(result['c_next'])
        for row, i in enumerate(group):
            out[i] = actions[row, : len(episodes[i])]
    return out
