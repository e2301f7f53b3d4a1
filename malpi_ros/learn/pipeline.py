"""Training windows as a ``tf.data`` stream: uint8 frames in, normalized float32 batches out.

Frames stay uint8 where ``dataset.load_recordings`` put them (in memory, or a read-only memmap
of the on-disk cache, so a recording larger than RAM trains) and are normalized with
``image.normalize`` — the very function the robot runs on every frame (DESIGN §1: no second
implementation of preprocessing, no train/serve skew). Where their float32 copy fits in the
run's budget (``TrainConfig.normalized_frames_gib``, ``normalized_frames``), every frame is
normalized once per run and batches gather float32 frames; otherwise each batch normalizes
its frames (a window frame is then normalized once for every window that holds it: the
simulator's 120-frame windows every 10 frames normalize each frame 12 times an epoch).

Two kinds of stream, one per ``DatasetConfig.state``:

``carried`` (``ChunkSource``): a batch is ``((x, reset), y, sample_weight)`` with x
(B, T, h, w, c): batch ``b`` row ``i`` continues where batch ``b - 1`` row ``i`` stopped
(``dataset.chunk_plan``), and ``reset`` (B,) float32 is 1 where the state must start from zero;
the trainer carries the LSTM state between batches. Batches stay in order (no shuffling of
batches; the plan is drawn anew every epoch).

``zero`` (``WindowSource``): a batch is ``(x, y, sample_weight)``:
    x (B, W, h, w, c) float32, y (B, W) int32 action labels,
    sample_weight (B, W) float32: 0 on the first ``burn_in`` steps of every window (the state is
    warming up there and is not judged, DESIGN §4), the label's class weight elsewhere.

Windows are shuffled every epoch from one seeded generator, so a run is repeatable; batches are
assembled in parallel (numpy releases the GIL for the copies) and prefetched so the model never
waits for the input.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import tensorflow as tf

from malpi_ros.config import PreprocessConfig
from malpi_ros.errors import DatasetError
from malpi_ros.learn.dataset import (
    PLAN_EPISODE,
    PLAN_LENGTH,
    PLAN_SINCE_RESET,
    PLAN_START,
    Episode,
    chunk_plan,
)
from malpi_ros.runtime.image import normalize

FLOAT32_BYTES = 4


def normalized_bytes(episodes: Sequence[Episode]) -> int:
    """Bytes of the float32 copy of ``episodes``' frames (``normalized_frames``)."""
    return FLOAT32_BYTES * sum(e.frames.size for e in episodes)


def normalized_frames(
    episodes: Sequence[Episode], preprocess: PreprocessConfig
) -> tuple[np.ndarray, ...]:
    """Every episode's frames normalized once (float32, one array per episode): the same
    ``normalize`` as per batch, frame by frame, so the same numbers."""
    return tuple(normalize(e.frames, preprocess) for e in episodes)


def available_memory() -> float:
    """Bytes of memory the machine can give without swapping (Linux ``MemAvailable``; the
    free pages elsewhere, and infinity where neither is known)."""
    try:
        with open('/proc/meminfo', encoding='ascii') as meminfo:
            for line in meminfo:
                if line.startswith('MemAvailable:'):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE'))
    except (ValueError, OSError, AttributeError):
        return math.inf


def _check_inputs(episodes: Sequence[Episode], inputs: Sequence[np.ndarray] | None) -> None:
    if inputs is None:
        return
    shapes = [e.frames.shape for e in episodes]
    if [x.shape for x in inputs] != shapes or any(x.dtype != np.float32 for x in inputs):
        raise DatasetError(
            "normalized inputs must be float32 arrays of the episodes' frame shapes "
            f'{shapes[:3]}..., got {[(x.dtype, x.shape) for x in inputs][:3]}...'
        )


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
    intervention_weight: float = 1.0  # times the loss of a takeover frame (Episode.takeover)
    # Each episode's frames normalized once (``normalized_frames``); None: per batch.
    inputs: Sequence[np.ndarray] | None = None

    def __post_init__(self) -> None:
        _check_inputs(self.episodes, self.inputs)
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

    def frames_float(self, rows: np.ndarray) -> np.ndarray:
        """float32 (len(rows), W, h, w, c): the model input of windows ``rows``."""
        if self.inputs is None:
            return normalize(self.frames_uint8(rows), self.preprocess)
        out = np.empty((len(rows), self.window, *self.frame_shape), np.float32)
        for i, row in enumerate(rows):
            episode, start = self.index[row]
            out[i] = self.inputs[episode][start : start + self.window]
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
        x = self.frames_float(rows)
        y = self.labels(rows)
        weight = self.weights[y]
        if self.intervention_weight != 1.0:
            for i, row in enumerate(rows):
                episode, start = self.index[row]
                weight[i] *= self.episodes[episode].weights(
                    start, start + self.window, self.intervention_weight
                )
        weight[:, : self.burn_in] = 0.0
        return x, y, weight

    def subset(self, episodes: Sequence[int]) -> WindowSource:
        """The windows of ``episodes`` (indices into ``self.episodes``) only: one worker's."""
        position = np.full(len(self.episodes), -1, np.int64)
        position[list(episodes)] = np.arange(len(episodes))
        index = self.index[position[self.index[:, 0]] >= 0].copy()
        index[:, 0] = position[index[:, 0]]
        return replace(
            self,
            episodes=[self.episodes[i] for i in episodes],
            index=index,
            inputs=None if self.inputs is None else [self.inputs[i] for i in episodes],
        )

    def take(self, rows: np.ndarray) -> WindowSource:
        """The windows at positions ``rows`` of the index only."""
        return replace(self, index=self.index[rows])

    def padded_batch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``batch`` where rows of -1 are padding: zero frames and labels with weight 0, so
        every worker runs as many steps as the others whatever windows it holds."""
        rows = np.asarray(rows, np.int64)
        real = rows >= 0
        if not real.any():
            shape = (len(rows), self.window)
            x = np.zeros((*shape, *self.frame_shape), np.float32)
            return x, np.zeros(shape, np.int32), np.zeros(shape, np.float32)
        x, y, weight = self.batch(np.where(real, rows, rows[real][0]))
        x[~real], y[~real], weight[~real] = 0.0, 0, 0.0
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

    dataset = _window_batches(source, orders, source.batch, None, parallel)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(batches))
    return dataset.prefetch(2)


def _window_batches(
    source: WindowSource,
    orders: Any,
    load: Any,
    rows: int | None,
    parallel: int | None,
) -> tf.data.Dataset:
    """``load(r)`` (x, y, sample_weight) of every array of ``rows`` window rows that the
    generator function ``orders`` yields, assembled in parallel, kept in order."""

    def load_tf(batch_rows: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        x, y, w = tf.numpy_function(load, [batch_rows], (tf.float32, tf.int32, tf.float32))
        x.set_shape((rows, source.window, *source.frame_shape))
        y.set_shape((rows, source.window))
        w.set_shape((rows, source.window))
        return x, y, w

    stream = tf.data.Dataset.from_generator(
        orders, output_signature=tf.TensorSpec((rows,), tf.int64)
    )
    return stream.map(
        load_tf,
        num_parallel_calls=tf.data.AUTOTUNE if parallel is None else parallel,
        deterministic=True,
    )


@dataclass(frozen=True, eq=False)
class ChunkSource:
    """Episodes as ``lanes`` state lanes of consecutive chunks (``dataset.chunk_plan``)."""

    episodes: Sequence[Episode]
    chunk: int  # frames per batch step
    lanes: int  # rows of every batch
    burn_in: int  # steps after a zero state that carry no loss
    preprocess: PreprocessConfig
    weights: np.ndarray  # float32 (num_actions,): sample weight per label
    split: bool = True  # cut episodes into pieces for busy lanes; False: whole (validation)
    intervention_weight: float = 1.0  # times the loss of a takeover frame (Episode.takeover)
    # Each episode's frames normalized once (``normalized_frames``); None: per batch.
    inputs: Sequence[np.ndarray] | None = None

    def __post_init__(self) -> None:
        _check_inputs(self.episodes, self.inputs)
        if self.chunk < 1 or self.lanes < 1 or self.burn_in < 0:
            raise DatasetError(
                f'chunk and lanes must be >= 1 and burn_in >= 0, got {self.chunk}, '
                f'{self.lanes}, {self.burn_in}'
            )

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        p = self.preprocess
        return (p.height, p.width, p.channels)

    def plan(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """The fixed plan (``rng`` None), or a random one of the same number of batches."""
        lengths = [len(e) for e in self.episodes]
        return chunk_plan(lengths, self.chunk, self.lanes, rng, split=self.split)

    def __len__(self) -> int:
        """Chunks of one pass without shuffling (padding not counted)."""
        return int(np.count_nonzero(self.plan()[..., PLAN_LENGTH]))

    def batch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(x float32, reset float32, y int32, sample_weight float32) of one plan batch
        ``rows`` (lanes, 4), or of a replica's group of its lanes; padding frames are zero with
        weight 0."""
        # Padding frames: zeros (a constant frame normalizes to zeros too).
        kind = np.uint8 if self.inputs is None else np.float32
        frames = np.zeros((len(rows), self.chunk, *self.frame_shape), kind)
        y = np.zeros((len(rows), self.chunk), np.int32)
        weight = np.zeros((len(rows), self.chunk), np.float32)
        steps = np.arange(self.chunk)
        for lane, row in enumerate(rows):
            n = int(row[PLAN_LENGTH])
            if n == 0:
                continue
            episode = self.episodes[int(row[PLAN_EPISODE])]
            start = int(row[PLAN_START])
            source = episode.frames if self.inputs is None else self.inputs[int(row[PLAN_EPISODE])]
            frames[lane, :n] = source[start : start + n]
            y[lane, :n] = episode.labels[start : start + n]
            scored = (row[PLAN_SINCE_RESET] + steps[:n]) >= self.burn_in
            factor = episode.weights(start, start + n, self.intervention_weight)
            weight[lane, :n] = np.where(scored, self.weights[y[lane, :n]] * factor, 0.0)
        reset = (rows[:, PLAN_SINCE_RESET] == 0).astype(np.float32)
        x = frames if self.inputs is not None else normalize(frames, self.preprocess)
        return x, reset, y, weight

    def subset(self, episodes: Sequence[int], lanes: int) -> ChunkSource:
        """The episodes ``episodes`` (indices into ``self.episodes``) only, in ``lanes`` lanes:
        one worker's share (its weights, takeover factor and normalized frames kept)."""
        return replace(
            self,
            episodes=[self.episodes[i] for i in episodes],
            lanes=lanes,
            inputs=None if self.inputs is None else [self.inputs[i] for i in episodes],
        )

    def loss_labels(self) -> np.ndarray:
        """Every label that carries loss (steps of the burn-in after a zero state left out)."""
        plan = self.plan()
        out = []
        for rows in plan:
            for row in rows:
                n, start = int(row[PLAN_LENGTH]), int(row[PLAN_START])
                skip = max(0, self.burn_in - int(row[PLAN_SINCE_RESET]))
                if n > skip:
                    labels = self.episodes[int(row[PLAN_EPISODE])].labels
                    out.append(labels[start + skip : start + n])
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def make_chunk_dataset(
    source: ChunkSource, *, shuffle: bool, seed: int = 0, parallel: int | None = None
) -> tf.data.Dataset:
    """A re-iterable ``tf.data.Dataset`` of ``((x, reset), y, sample_weight)`` batches, in
    plan order (the state flows from one batch to the next). With ``shuffle`` every pass
    (epoch) draws a new plan from one generator seeded with ``seed``."""
    if not source.episodes:
        raise DatasetError('no episodes to make chunks of')
    return replica_chunk_dataset([source], 0, 1, shuffle=shuffle, seed=seed, parallel=parallel)


def replica_chunk_dataset(
    sources: Sequence[ChunkSource],
    worker: int,
    replicas: int,
    *,
    shuffle: bool,
    seed: int = 0,
    parallel: int | None = None,
) -> tf.data.Dataset:
    """Worker ``worker``'s chunk batches when ``sources[w]`` holds worker ``w``'s episodes,
    one element for each of its ``replicas`` local replicas in turn.

    Every epoch the plans of all workers are drawn from one generator seeded with ``seed``
    (so every worker knows every plan) and padded to the longest: collective training needs
    every worker in every step. A worker's lanes are cut into ``replicas`` groups, yielded in
    turn, because tf.distribute hands a worker's consecutive elements to its replicas in
    turn: replica ``r`` always steps through the same lanes, and its state stays theirs.
    One source, one replica: the plain ``make_chunk_dataset``.
    """
    source = sources[worker]
    if source.lanes % replicas:
        raise DatasetError(f'{source.lanes} lanes do not divide among {replicas} replicas')
    lanes = source.lanes // replicas
    rng = np.random.default_rng(seed)

    def rows() -> Any:
        plans = [s.plan(rng if shuffle else None) for s in sources]
        plan = plans[worker]
        steps = max(len(p) for p in plans)
        padded = np.zeros((steps, source.lanes, 4), np.int64)
        padded[: len(plan)] = plan
        for batch in padded:
            yield from (batch[r * lanes : (r + 1) * lanes] for r in range(replicas))

    def load_tf(plan_rows: tf.Tensor) -> tuple[tuple[tf.Tensor, tf.Tensor], tf.Tensor, tf.Tensor]:
        x, reset, y, w = tf.numpy_function(
            source.batch, [plan_rows], (tf.float32, tf.float32, tf.int32, tf.float32)
        )
        x.set_shape((lanes, source.chunk, *source.frame_shape))
        reset.set_shape((lanes,))
        y.set_shape((lanes, source.chunk))
        w.set_shape((lanes, source.chunk))
        return (x, reset), y, w

    plans = tf.data.Dataset.from_generator(
        rows, output_signature=tf.TensorSpec((lanes, 4), tf.int64)
    )
    dataset = plans.map(
        load_tf,
        num_parallel_calls=tf.data.AUTOTUNE if parallel is None else parallel,
        deterministic=True,  # the state flows from each batch to the next: order matters
    )
    return dataset.prefetch(2)


def replica_window_dataset(
    sources: Sequence[WindowSource],
    worker: int,
    replicas: int,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    parallel: int | None = None,
) -> tf.data.Dataset:
    """Worker ``worker``'s window batches, one element for each of its ``replicas`` in turn,
    when ``sources[w]`` holds worker ``w``'s windows: its own windows (shuffled by a generator
    seeded with ``seed`` and the worker) dealt to its replicas, in batches of up to
    ``batch_size`` (one replica's share of the global batch). Every epoch every worker runs the
    same number of steps, the most any replica needs: a replica out of windows gets one row of
    padding (weight 0; a batch of none would not pass the LSTM). Replicas holding equally many
    windows need no padding at all (validation is cut that way, ``distribute``)."""
    source = sources[worker]
    steps = max(math.ceil(math.ceil(len(s) / replicas) / batch_size) for s in sources)
    rng = np.random.default_rng([seed, worker])

    def orders() -> Any:
        order = rng.permutation(len(source)) if shuffle else np.arange(len(source))
        for step in range(steps):
            for replica in range(replicas):
                rows = order[replica::replicas][step * batch_size : (step + 1) * batch_size]
                yield rows if len(rows) else np.full(1, -1, np.int64)

    return _window_batches(source, orders, source.padded_batch, None, parallel).prefetch(2)
