"""Training windows as a ``tf.data`` stream: uint8 frames in, normalized float32 batches out.

Frames stay uint8 where ``dataset.load_recordings`` put them (in memory, or a read-only memmap
of the on-disk cache, so a recording larger than RAM trains); each batch is gathered from the
episodes and normalized with ``image.normalize`` — the very function the robot runs on every
frame (DESIGN §1: no second implementation of preprocessing, no train/serve skew).

A batch is ``(x, y, sample_weight)``:
    x (B, W, h, w, c) float32, y (B, W) int32 action labels,
    sample_weight (B, W) float32: 0 on the first ``burn_in`` steps of every window (the state is
    warming up there and is not judged, DESIGN §4), the label's class weight elsewhere.

Windows are shuffled every epoch from one seeded generator, so a run is repeatable; batches are
assembled in parallel (numpy releases the GIL for the copies) and prefetched so the model never
waits for the input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from malpi_ros.config import PreprocessConfig
from malpi_ros.dataset import Episode
from malpi_ros.errors import DatasetError
from malpi_ros.image import normalize


def class_weights(labels: np.ndarray, num_actions: int, cap: float) -> np.ndarray:
    """float32 (num_actions,) weights making every present action count alike, capped at ``cap``.

    Weight ``k`` is ``n / (present * count_k)`` (balanced), capped so an action seen a handful of
    times cannot dominate, then scaled so the average weight over the given labels is 1 (the loss
    keeps its usual size, and the learning rate its meaning). Actions absent from ``labels``
    get 0: there is nothing of theirs to weight.
    """
    labels = np.asarray(labels).reshape(-1)
    labels = labels[labels >= 0]
    if labels.size == 0:
        raise DatasetError('no labels to compute class weights from')
    if not cap >= 1.0:
        raise DatasetError(f'class weight cap must be >= 1, got {cap!r}')
    counts = np.bincount(labels, minlength=num_actions).astype(np.float64)[:num_actions]
    present = counts > 0
    weights = np.zeros(num_actions, np.float64)
    weights[present] = labels.size / (present.sum() * counts[present])
    weights[present] = np.minimum(weights[present] / weights[present].min(), cap)
    weights *= labels.size / float((weights * counts).sum())
    return weights.astype(np.float32)


@dataclass(frozen=True, eq=False)
class WindowSource:
    """Windows of episodes, and everything needed to turn a list of them into a batch."""

    episodes: Sequence[Episode]
    index: np.ndarray  # int64 (N, 2): [episode, first frame], see dataset.windows
    window: int  # frames per window (burn_in + seq_len)
    burn_in: int
    preprocess: PreprocessConfig
    weights: np.ndarray  # float32 (num_actions,): sample weight per label

    def __post_init__(self) -> None:
        if self.index.ndim != 2 or self.index.shape[1] != 2:
            raise DatasetError(f'window index must be (N, 2), got {self.index.shape}')
        if not 0 <= self.burn_in < self.window:
            raise DatasetError(f'burn_in must be in [0, window={self.window}), got {self.burn_in}')

    def __len__(self) -> int:
        return len(self.index)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        p = self.preprocess
        return (p.height, p.width, p.channels)

    def frames_uint8(self, rows: np.ndarray) -> np.ndarray:
        """uint8 (len(rows), W, h, w, c): the frames of windows ``rows`` (positions in index)."""
        out = np.empty((len(rows), self.window, *self.frame_shape), np.uint8)
        for i, row in enumerate(rows):
            episode, start = self.index[row]
            out[i] = self.episodes[episode].frames[start : start + self.window]
        return out

    def labels(self, rows: np.ndarray) -> np.ndarray:
        """int32 (len(rows), W): the labels of windows ``rows``."""
        out = np.empty((len(rows), self.window), np.int32)
        for i, row in enumerate(rows):
            episode, start = self.index[row]
            out[i] = self.episodes[episode].labels[start : start + self.window]
        return out

    def batch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x float32, y int32, sample_weight float32) of windows ``rows``."""
        rows = np.asarray(rows, np.int64)
        x = normalize(self.frames_uint8(rows), self.preprocess)
        y = self.labels(rows)
        weight = self.weights[y]
        weight[:, : self.burn_in] = 0.0
        return x, y, weight

    def loss_labels(self) -> np.ndarray:
        """Every label that carries loss (burn-in steps left out), for class weights."""
        if len(self) == 0:
            return np.zeros(0, np.int64)
        return self.labels(np.arange(len(self)))[:, self.burn_in :].reshape(-1)


def make_dataset(
    source: WindowSource,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    parallel: int | None = None,
) -> tf.data.Dataset:
    """A re-iterable ``tf.data.Dataset`` of ``(x, y, sample_weight)`` batches over ``source``.

    With ``shuffle``, each pass (epoch) visits the windows in a new order drawn from one
    generator seeded with ``seed``: the sequence of epochs is the same on every run. The last
    batch may be smaller. The dataset knows its length (Keras shows a real progress bar).
    """
    if len(source) == 0:
        raise DatasetError('no windows to make batches of')
    if batch_size < 1:
        raise DatasetError(f'batch_size must be >= 1, got {batch_size}')
    n = len(source)
    batches = -(-n // batch_size)
    rng = np.random.default_rng(seed)

    def orders():  # type: ignore[no-untyped-def]
        order = rng.permutation(n) if shuffle else np.arange(n)
        for b in range(batches):
            yield order[b * batch_size : (b + 1) * batch_size]

    def load(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return source.batch(rows)

    def load_tf(rows: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        x, y, w = tf.numpy_function(load, [rows], (tf.float32, tf.int32, tf.float32))
        x.set_shape((None, source.window, *source.frame_shape))
        y.set_shape((None, source.window))
        w.set_shape((None, source.window))
        return x, y, w

    rows = tf.data.Dataset.from_generator(
        orders, output_signature=tf.TensorSpec((None,), tf.int64)
    )
    dataset = rows.map(
        load_tf,
        num_parallel_calls=tf.data.AUTOTUNE if parallel is None else parallel,
        deterministic=True,
    )
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(batches))
    return dataset.prefetch(2)
