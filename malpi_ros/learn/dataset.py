"""Recordings to labelled episodes and training windows: plain numpy, no TensorFlow.

The pipeline (DESIGN §1, §4): read each bag once; decode and ``image.fit_frame`` every camera
frame to uint8; label each frame with the latest command at or before ``stamp + lag``; cut
episodes at gaps and at dropped frames; cut episodes into windows of ``burn_in + seq_len``
frames that never cross an episode boundary. The trainer builds its ``tf.data`` on top.

Labels come from the driver's ``~/applied`` when a recording has it (what the motors got,
and from which input), from ``cmd_vel`` otherwise; with ``applied`` a frame whose latest
command came from teleop is a *takeover* frame (``Episode.takeover``), which training can
weight (``TrainConfig.intervention_weight``) and ``inspect`` counts.

Clock: frames and commands are aligned on the bag's receive times (see ``malpi_ros.bagio.reader``);
image header stamps only serve to measure the frame period ``dt`` when every frame has one.

Frames can be cached on disk (``cache_dir``): one uint8 ``.npy`` per bag, written frame by
frame through a memmap (a recording larger than RAM works), keyed by the bag's SHA-256, the
topics and the preprocessing, and read back as a memmap the next time.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from malpi_ros import diskspace
from malpi_ros.bagio import reader as bagio
from malpi_ros.config import ActionTable, DatasetConfig, PreprocessConfig, to_dict
from malpi_ros.errors import BagError, DatasetError, DecodeError, StorageError
from malpi_ros.progress import progress
from malpi_ros.runtime.actions import labels_for
from malpi_ros.runtime.image import decode, fit_frame

CACHE_VERSION = 2  # bump when what the cache holds, or how frames are made, changes
MAX_REASONS = 5  # distinct reasons kept per bag for malformed frames (the count is exact)


# -- labels ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlignmentStats:
    """How frames got their labels (counts of frames unless named otherwise)."""

    frames: int
    commands: int  # commands given, NaN ones included
    nan_commands: int  # commands with a NaN/inf component: ignored as if never sent
    fresh: int  # labelled from a command at most cmd_timeout old
    stale: int  # no command yet, or the latest older than cmd_timeout
    dropped: int  # labelled -1 (stale frames when stale='drop')


def align_labels(
    frame_t: np.ndarray,
    cmd_t: np.ndarray,
    cmd_lin: np.ndarray,
    cmd_ang: np.ndarray,
    cfg: DatasetConfig,
    table: ActionTable,
) -> tuple[np.ndarray, AlignmentStats]:
    """Label per frame: the action of the latest command at or before ``frame_t + cfg.lag``.

    A frame with no command yet, or whose latest command is older than ``cfg.cmd_timeout``
    (measured at ``frame_t + lag``), is labelled stop (``stale='stop'``) or -1
    (``stale='drop'``). Commands with a NaN/inf component are ignored (counted). Times are
    seconds on one clock; commands need not be sorted.
    """
    frame_t = np.asarray(frame_t, dtype=np.float64)
    cmd_t = np.asarray(cmd_t, dtype=np.float64)
    lin = np.asarray(cmd_lin, dtype=np.float64)
    ang = np.asarray(cmd_ang, dtype=np.float64)
    if frame_t.ndim != 1 or not (cmd_t.shape == lin.shape == ang.shape) or cmd_t.ndim != 1:
        raise DatasetError(
            'align_labels needs 1-D frame times and equal 1-D command arrays, got '
            f'frames {frame_t.shape}, times {cmd_t.shape}, linear {lin.shape}, '
            f'angular {ang.shape}'
        )
    valid = np.isfinite(lin) & np.isfinite(ang) & np.isfinite(cmd_t)
    latest, fresh = _latest_commands(frame_t, cmd_t, valid, cfg)
    labels = np.full(frame_t.shape, table.stop_index if cfg.stale == 'stop' else -1, np.int64)
    if fresh.any():
        picked = latest[fresh]
        labels[fresh] = labels_for(lin[picked], ang[picked], table)
    stale = int(np.count_nonzero(~fresh))
    stats = AlignmentStats(
        frames=int(frame_t.size),
        commands=int(cmd_t.size),
        nan_commands=int(np.count_nonzero(~valid)),
        fresh=int(np.count_nonzero(fresh)),
        stale=stale,
        dropped=stale if cfg.stale == 'drop' else 0,
    )
    return labels, stats


# -- episodes and windows --------------------------------------------------------------------


def split_episodes(
    frame_t: np.ndarray, gap: float, labels: np.ndarray | None = None
) -> list[slice]:
    """Slices of consecutive frames with no pause longer than ``gap`` seconds between them.

    Frames labelled -1 (dropped) belong to no episode and end the one before them: a window
    must not jump over a hole in the labels.
    """
    frame_t = np.asarray(frame_t, dtype=np.float64)
    n = frame_t.size
    keep = np.ones(n, bool) if labels is None else np.asarray(labels) >= 0
    if labels is not None and np.shape(labels) != frame_t.shape:
        raise DatasetError(f'labels {np.shape(labels)} do not match frame times {frame_t.shape}')
    # A boundary before frame i when the pause before it is too long or frame i-1 was dropped.
    breaks = np.zeros(n, bool)
    if n > 1:
        breaks[1:] = (np.diff(frame_t) > gap) | ~keep[:-1]
    slices = []
    start = None
    for i in range(n):
        if start is not None and (breaks[i] or not keep[i]):
            slices.append(slice(start, i))
            start = None
        if start is None and keep[i]:
            start = i
    if start is not None:
        slices.append(slice(start, n))
    return slices


def _latest_commands(
    frame_t: np.ndarray, cmd_t: np.ndarray, valid: np.ndarray, cfg: DatasetConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: the index (into ``cmd_t``) of the latest ``valid`` command at or before
    ``frame_t + lag``, and whether it exists and is at most ``cmd_timeout`` old there."""
    where = np.flatnonzero(valid)
    order = where[np.argsort(cmd_t[where], kind='stable')]
    query = frame_t + cfg.lag
    position = np.searchsorted(cmd_t[order], query, side='right') - 1
    has = position >= 0
    if not len(order):
        return np.zeros(frame_t.shape, np.int64), np.zeros(frame_t.shape, bool)
    latest = order[np.maximum(position, 0)]
    fresh = has & (query - cmd_t[latest] <= cfg.cmd_timeout)
    return latest, fresh


def takeover_flags(
    frame_t: np.ndarray,
    cmd_t: np.ndarray,
    cmd_lin: np.ndarray,
    cmd_ang: np.ndarray,
    cmd_src: np.ndarray,
    cfg: DatasetConfig,
) -> np.ndarray:
    """bool per frame: its label came from a teleop takeover (the command ``align_labels``
    labels it from has the teleop source). All False for a recording labelled from
    ``cmd_vel`` (no source)."""
    frame_t = np.asarray(frame_t, np.float64)
    cmd_t = np.asarray(cmd_t, np.float64)
    valid = np.isfinite(cmd_lin) & np.isfinite(cmd_ang) & np.isfinite(cmd_t)
    latest, fresh = _latest_commands(frame_t, cmd_t, valid, cfg)
    if not len(cmd_t):
        return fresh
    return fresh & (np.asarray(cmd_src)[latest] == bagio.TELEOP_SOURCE)


def takeover_runs(stamps: np.ndarray, flags: np.ndarray) -> list[tuple[int, float]]:
    """(frames, seconds) of each run of consecutive takeover frames of one episode; seconds
    from its first frame to the frame after its last (the episode's end: its last frame)."""
    flags = np.asarray(flags, bool)
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    runs = []
    starts = np.flatnonzero(edges == 1).tolist()
    stops = np.flatnonzero(edges == -1).tolist()
    for start, stop in zip(starts, stops, strict=True):
        end = stamps[min(stop, len(stamps) - 1)]
        runs.append((stop - start, float(end - stamps[start])))
    return runs


def median_period(stamps: np.ndarray) -> float:
    """Median spacing of sorted stamps in seconds; NaN for fewer than two."""
    stamps = np.asarray(stamps, dtype=np.float64)
    return float(np.median(np.diff(stamps))) if stamps.size >= 2 else float('nan')


@dataclass(frozen=True, eq=False)
class Episode:
    """Consecutive labelled frames of one bag, with no gap or dropped frame inside.

    ``frames`` is uint8 (N, h, w, c), possibly a read-only view of a memmapped cache file;
    ``stamps`` are receive times (s); ``dt`` the median frame period; ``takeover`` (bool per
    frame, all False when not given) marks frames labelled from a teleop takeover.
    """

    bag: str
    index: int
    stamps: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    frames: np.ndarray = field(repr=False)
    dt: float
    takeover: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        n = len(self.stamps)
        if self.takeover is None:
            object.__setattr__(self, 'takeover', np.zeros(n, bool))
        if len(self.labels) != n or len(self.frames) != n or len(self.flags) != n:
            raise DatasetError(
                f'episode {self.index} of {self.bag}: {n} stamps, {len(self.labels)} labels, '
                f'{len(self.frames)} frames, {len(self.flags)} takeover flags'
            )

    @property
    def flags(self) -> np.ndarray:
        """``takeover`` as a bool array (never None after construction)."""
        assert self.takeover is not None
        return self.takeover

    def weights(self, start: int, stop: int, intervention_weight: float) -> np.ndarray:
        """float32 loss factor of frames ``start:stop``: ``intervention_weight`` on takeover
        frames, 1 elsewhere."""
        return np.where(self.flags[start:stop], intervention_weight, 1.0).astype(np.float32)

    def __len__(self) -> int:
        return len(self.stamps)

    @property
    def duration(self) -> float:
        return float(self.stamps[-1] - self.stamps[0]) if len(self) else 0.0

    def part(self, start: int, stop: int, index: int | None = None) -> Episode:
        """Frames ``start:stop`` as an episode of their own (views, no copy; same ``dt``)."""
        return replace(
            self,
            index=self.index if index is None else index,
            stamps=self.stamps[start:stop],
            labels=self.labels[start:stop],
            frames=self.frames[start:stop],
            takeover=self.flags[start:stop],
        )


def windows(episodes: Sequence[Episode], cfg: DatasetConfig) -> np.ndarray:
    """int64 (num_windows, 2) of [episode index, first frame], all inside one episode:
    ``cfg.window`` frames each, started every ``cfg.stride`` frames (``state: zero``), or the
    consecutive chunks of ``cfg.seq_len`` frames (``carried``; the last may be shorter).
    Episodes shorter than ``cfg.min_frames`` give none (see ``short_episodes``)."""
    rows = [
        np.stack([np.full(len(starts), i), starts], axis=1)
        for i, ep in enumerate(episodes)
        if len(starts := _starts(len(ep), cfg)) > 0
    ]
    return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 2), np.int64)


# Columns of a chunk plan (``chunk_plan``): which frames a lane steps through next.
PLAN_EPISODE, PLAN_START, PLAN_LENGTH, PLAN_SINCE_RESET = range(4)


def chunk_plan(
    lengths: Sequence[int],
    chunk: int,
    lanes: int,
    rng: np.random.Generator | None = None,
    batches: int | None = None,
    split: bool = True,
) -> np.ndarray:
    """int64 (batches, lanes, 4): what each of ``lanes`` parallel state lanes steps through.

    Row ``[b, lane]`` is ``[episode, first frame, length, steps since the state was zero]``:
    batch ``b`` of lane ``lane`` continues from the state that batch ``b - 1`` of the same lane
    ended with, unless ``steps since`` is 0 (a zero state: an episode or piece starts). Length 0
    is padding (no frames, no loss). Each episode is cut into consecutive chunks of ``chunk``
    frames (its last chunk may be shorter); with ``split`` episodes are cut into pieces of
    about ``total / lanes`` frames so that every lane has work (without it, as validation
    does, every episode runs whole from one zero state); pieces are dealt to the lane with the
    least work. With ``rng`` every epoch differs: the chunk boundaries of each episode longer
    than a chunk move by a random offset below ``chunk`` (its first chunk is shorter; every
    frame is still stepped through once) and pieces are shuffled; without it the plan is
    fixed, and so is its length: random plans vary by a few batches. ``batches``: the plan is
    cut or padded to that many batches.
    """
    if chunk < 1 or lanes < 1:
        raise DatasetError(f'chunk and lanes must be >= 1, got {chunk} and {lanes}')
    # Each episode as consecutive chunks [start, length]. With ``rng`` an episode longer than a
    # chunk gets its boundaries moved by a random offset: its first chunk is the shorter one,
    # and no frame is dropped (a drive as long as a chunk would lose its start, cue included).
    episodes: list[list[tuple[int, int, int]]] = []
    for episode, n in enumerate(lengths):
        if n < 1:
            continue
        offset = int(rng.integers(0, chunk)) if rng is not None and n > chunk else 0
        cuts = [0, *range(offset or chunk, n, chunk), n]
        episodes.append([(episode, a, b - a) for a, b in itertools.pairwise(cuts)])
    if not episodes:
        return np.zeros((batches or 0, lanes, 4), np.int64)
    total_chunks = sum(len(chunks) for chunks in episodes)
    per = max(1, -(-total_chunks // lanes)) if split else max(map(len, episodes))
    pieces = [chunks[at : at + per] for chunks in episodes for at in range(0, len(chunks), per)]
    if rng is not None:
        pieces = [pieces[i] for i in rng.permutation(len(pieces))]
    work: list[list[tuple[int, int, int, int]]] = [[] for _ in range(lanes)]
    for piece in pieces:
        lane = min(range(lanes), key=lambda i: len(work[i]))
        first = piece[0][1]
        work[lane] += [(episode, start, n, start - first) for episode, start, n in piece]
    length = max(len(w) for w in work) if batches is None else batches
    plan = np.zeros((length, lanes, 4), np.int64)
    for lane, rows in enumerate(work):
        if rows := rows[:length]:
            plan[: len(rows), lane] = rows
    return plan


def _starts(length: int, cfg: DatasetConfig) -> np.ndarray:
    if length < cfg.min_frames:
        return np.zeros(0, np.int64)
    if cfg.state == 'zero':
        return np.arange(0, length - cfg.window + 1, cfg.stride)
    return np.arange(0, length, cfg.seq_len)


def training_units(lengths: Sequence[int], cfg: DatasetConfig) -> int:
    """How many windows or chunks (``cfg.unit``) episodes of these lengths give."""
    return sum(len(_starts(n, cfg)) for n in lengths)


def short_episodes(episodes: Sequence[Episode], cfg: DatasetConfig) -> int:
    """How many episodes are too short to train on (``cfg.min_frames``)."""
    return sum(1 for ep in episodes if len(ep) < cfg.min_frames)


class Split(NamedTuple):
    """Training and validation episodes, and a sentence on how they were chosen."""

    train: list[Episode]
    val: list[Episode]
    note: str


def split_by_episode(episodes: Sequence[Episode], val_fraction: float, seed: int) -> Split:
    """Hold out whole episodes for validation, about ``val_fraction`` of all frames.

    No validation frame is ever in a training episode: windows of neighbouring frames are
    nearly identical, so a split by window would measure memorization. With a single episode
    there is nothing to hold out whole: its last ``val_fraction`` of frames becomes a separate
    validation episode (the note says so). ``val_fraction=0`` gives no validation.
    """
    episodes = list(episodes)
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f'val_fraction must be in [0, 1), got {val_fraction!r}')
    if not episodes:
        raise DatasetError('no episodes to split')
    total = sum(len(ep) for ep in episodes)
    if val_fraction == 0.0:
        return Split(episodes, [], f'no validation: all {len(episodes)} episodes train')
    if len(episodes) == 1:
        ep = episodes[0]
        cut = len(ep) - max(1, round(len(ep) * val_fraction))
        if cut < 1:
            raise DatasetError(
                f'the only episode ({ep.bag} #{ep.index}) has {len(ep)} frames: too few to '
                'split by time'
            )
        note = (
            f'only one episode ({ep.bag} #{ep.index}, {len(ep)} frames): split by time, its '
            f'last {len(ep) - cut} frames (from t={ep.stamps[cut]:.3f}) are the validation '
            'episode'
        )
        return Split([ep.part(0, cut)], [ep.part(cut, len(ep), ep.index + 1)], note)
    rng = np.random.default_rng(seed)
    order = [int(i) for i in rng.permutation(len(episodes))]
    target = val_fraction * total
    val_ids: list[int] = []
    val_frames = 0
    for i in order[:-1]:  # at least one episode stays for training
        if val_ids and val_frames >= target:
            break
        val_ids.append(i)
        val_frames += len(episodes[i])
    chosen = set(val_ids)
    train = [ep for i, ep in enumerate(episodes) if i not in chosen]
    val = [ep for i, ep in enumerate(episodes) if i in chosen]
    note = (
        f'{len(val)} of {len(episodes)} episodes held out for validation '
        f'({val_frames} of {total} frames, {val_frames / total:.0%}; seed {seed})'
    )
    return Split(train, val, note)


def share_by_episode(lengths: Sequence[int], workers: int) -> list[list[int]]:
    """The episodes (indices into ``lengths``) each of ``workers`` trains on: whole episodes,
    each to one worker only, about the same number of frames each (the longest first, each to
    the worker with the fewest frames so far; ties to the lower worker). The same lengths give
    the same shares on every worker, so no window is seen by two workers in an epoch."""
    if workers < 1:
        raise DatasetError(f'workers must be >= 1, got {workers}')
    shares: list[list[int]] = [[] for _ in range(workers)]
    frames = [0] * workers
    for episode in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        worker = min(range(workers), key=lambda w: (frames[w], w))
        shares[worker].append(episode)
        frames[worker] += lengths[episode]
    return [sorted(share) for share in shares]


# -- reading recordings ----------------------------------------------------------------------


@dataclass(frozen=True)
class BagReport:
    """What loading one bag found; ``cache`` is 'off', 'hit' (frames read back) or 'written'."""

    bag: str
    sha256: str
    topics: bagio.Topics
    image_messages: int
    frames: int  # decoded and fitted
    malformed: int  # image messages skipped (undeserializable or undecodable)
    malformed_reasons: tuple[tuple[str, int], ...]  # up to MAX_REASONS distinct, with counts
    alignment: AlignmentStats
    episodes: int
    short_episodes: int
    dt: float
    dt_source: str  # 'header' (camera stamps) or 'receive'
    clock_offset: float | None  # median image header stamp - receive time, s
    label_histogram: tuple[int, ...]
    cache: str
    cache_file: str | None
    takeover_frames: int = 0  # in episodes, labelled from a teleop takeover (applied)


@dataclass(frozen=True, eq=False)
class Recordings:
    """Everything the trainer needs from the bags: episodes, windows, and what was found."""

    episodes: tuple[Episode, ...]
    windows: np.ndarray  # windows(episodes, dataset)
    reports: tuple[BagReport, ...]
    action_names: tuple[str, ...]
    label_histogram: np.ndarray  # frames per action over all episodes
    dt: float
    short_episodes: int
    dataset: DatasetConfig
    preprocess: PreprocessConfig

    @property
    def frames(self) -> int:
        return sum(len(ep) for ep in self.episodes)

    def describe(self) -> str:
        """A few lines for a terminal or a log."""
        lines = []
        for r in self.reports:
            a = r.alignment
            lines.append(
                f'{r.bag}: {r.frames} frames ({r.malformed} malformed), {a.commands} commands '
                f'({a.nan_commands} NaN), {a.stale} stale, {a.dropped} dropped, '
                f'{r.episodes} episodes, dt {r.dt * 1000:.1f} ms ({r.dt_source}), '
                f'cache {r.cache}; labels from {r.topics.cmd_topic} ({r.topics.cmd_kind}), '
                f'{r.takeover_frames} takeover frames'
            )
            lines += [f'  malformed x{count}: {reason}' for reason, count in r.malformed_reasons]
        hist = ', '.join(
            f'{name} {count}'
            for name, count in zip(self.action_names, self.label_histogram, strict=True)
        )
        lines.append(
            f'{len(self.episodes)} episodes, {self.frames} frames, {len(self.windows)} '
            f'{self.dataset.unit} ({self.short_episodes} episodes too short); '
            f'labels: {hist}'
        )
        return '\n'.join(lines)


class _FrameSink:
    """Fitted frames, appended one at a time into a preallocated array or a memmapped .npy.

    Capacity comes from the bag's index; should a bag hold more, the array grows (doubling).
    """

    def __init__(self, shape: tuple[int, ...], capacity: int, path: Path | None) -> None:
        self.shape = shape
        self.path = path
        self.count = 0
        self.array = self._allocate(max(capacity, 1))

    def _allocate(self, capacity: int) -> np.ndarray:
        if self.path is None:
            return np.empty((capacity, *self.shape), np.uint8)
        return _open_cache_file(self.path, (capacity, *self.shape))

    def append(self, frame: np.ndarray) -> None:
        if self.count == len(self.array):
            old = self.array
            if self.path is None:
                self.array = self._allocate(2 * len(old))
                self.array[: len(old)] = old
            else:
                grown = self.path.with_suffix(f'.{os.getpid()}.grow.npy')
                try:
                    new = _open_cache_file(grown, (2 * len(old), *self.shape))
                    new[: len(old)] = old
                    new.flush()  # type: ignore[attr-defined]  # a np.memmap
                except BaseException:
                    with contextlib.suppress(OSError):
                        grown.unlink()
                    raise
                del old
                grown.replace(self.path)
                self.array = np.load(self.path, mmap_mode='r+')
        self.array[self.count] = frame
        self.count += 1

    def finish(self) -> np.ndarray:
        if isinstance(self.array, np.memmap):
            self.array.flush()
        return self.array


def _open_cache_file(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A new memmapped uint8 .npy with every block reserved (no SIGBUS on a full disk)."""
    array = np.lib.format.open_memmap(path, mode='w+', dtype=np.uint8, shape=shape)
    diskspace.preallocate(path)
    return array


def cache_bytes(
    bags: Sequence[str | Path],
    cfg: PreprocessConfig,
    image_topic: str | None,
    cmd_topic: str | None,
    cache_dir: Path,
) -> int:
    """Bytes the frame cache will write for ``bags``: frames (from each bag's index) x H x W x C,
    for every bag without a complete cache entry already."""
    total = 0
    frame = cfg.height * cfg.width * cfg.channels
    for path in bags:
        with bagio.open_bag(path) as bag:
            topics = bagio.find_topics(bag, image_topic, cmd_topic)
            frames_path, meta_path = _cache_paths(
                cache_dir, Path(path), _cache_key(_bag_sha(Path(path)), topics, cfg)
            )
            if not (frames_path.exists() and meta_path.exists()):
                total += bag.topics[topics.image_topic][1] * frame
    return total


_SHA_MEMO: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}


def _bag_sha(path: Path) -> str:
    """``bags.sha256_of_bag``, remembered per file sizes and times: the room check and the
    read both need it, and hashing a large bag twice costs seconds."""
    files = bagio.storage_files(path)
    key = (
        str(path.resolve()),
        tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files),
    )
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = bagio.sha256_of_bag(path)
    return _SHA_MEMO[key]


def _cache_key(sha: str, topics: bagio.Topics, cfg: PreprocessConfig) -> str:
    spec = {
        'version': CACHE_VERSION,
        'bag_sha256': sha,
        'image_topic': topics.image_topic,
        'cmd_topic': topics.cmd_topic,
        'preprocess': to_dict(cfg),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _cache_paths(cache_dir: Path, bag: Path, key: str) -> tuple[Path, Path]:
    stem = f'{bag.name or "bag"}-{key[:16]}'
    return cache_dir / f'{stem}.frames.npy', cache_dir / f'{stem}.meta.npz'


class _Read(NamedTuple):
    """One bag's raw material: frames (rows [:n] valid), their stamps, and the commands."""

    frames: np.ndarray
    frame_t: np.ndarray
    header_t: np.ndarray
    cmd_t: np.ndarray
    cmd_lin: np.ndarray
    cmd_ang: np.ndarray
    cmd_src: np.ndarray  # int8: AppliedCommand source per command, -1 for a Twist
    image_messages: int
    malformed: int
    reasons: tuple[tuple[str, int], ...]


def _read_bag(
    bag: bagio.Bag, topics: bagio.Topics, cfg: PreprocessConfig, frames_path: Path | None
) -> _Read:
    """One pass over the bag: decode + fit every frame, collect every command."""
    capacity = bag.topics[topics.image_topic][1]
    sink = _FrameSink((cfg.height, cfg.width, cfg.channels), capacity, frames_path)
    frame_t: list[float] = []
    header_t: list[float] = []
    cmds: list[tuple[float, float, float, int]] = []
    reasons: Counter[str] = Counter()
    image_messages = 0
    messages = progress(
        bag.raw_messages([topics.image_topic, topics.cmd_topic]),
        total=capacity + bag.topics[topics.cmd_topic][1],
        desc=f'reading {bag.path.name}',
        unit='msg',
    )
    for topic, t_ns, raw in messages:
        t = t_ns * 1e-9
        if topic == topics.cmd_topic:
            msg = bag.deserialize(raw, topic)  # a malformed command is a broken bag: BagError
            cmds.append((t, *bagio.command_of(msg)))
            continue
        image_messages += 1
        try:
            msg = bag.deserialize(raw, topic)
            frame = fit_frame(decode(msg), cfg)
        except (BagError, DecodeError) as err:
            reasons[str(err)] += 1
            continue
        sink.append(frame)
        frame_t.append(t)
        stamp = bagio.header_stamp(msg)
        header_t.append(np.nan if stamp is None else stamp)
    cmd = np.asarray(cmds, dtype=np.float64).reshape(-1, 4)
    return _Read(
        frames=sink.finish(),
        frame_t=np.asarray(frame_t, np.float64),
        header_t=np.asarray(header_t, np.float64),
        cmd_t=cmd[:, 0].copy(),
        cmd_lin=cmd[:, 1].copy(),
        cmd_ang=cmd[:, 2].copy(),
        cmd_src=cmd[:, 3].astype(np.int8),
        image_messages=image_messages,
        malformed=sum(reasons.values()),
        reasons=tuple(reasons.most_common(MAX_REASONS)),
    )


def _save_meta(path: Path, read: _Read) -> None:
    tmp = path.with_suffix(f'.{os.getpid()}.tmp.npz')  # two trainings may share a cache
    info = {
        'image_messages': read.image_messages,
        'malformed': read.malformed,
        'reasons': [list(r) for r in read.reasons],
    }
    try:
        with tmp.open('wb') as stream:
            np.savez(
                stream,
                frame_t=read.frame_t,
                header_t=read.header_t,
                cmd_t=read.cmd_t,
                cmd_lin=read.cmd_lin,
                cmd_ang=read.cmd_ang,
                cmd_src=read.cmd_src,
                info=np.array(json.dumps(info)),
            )
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    tmp.replace(path)  # the meta file appears last and whole: it marks a complete entry


def _load_cached(frames_path: Path, meta_path: Path) -> _Read | None:
    """The cached read of a bag, or None when there is no complete, readable entry."""
    if not (frames_path.exists() and meta_path.exists()):
        return None
    try:
        with np.load(meta_path) as meta:
            info = json.loads(str(meta['info']))
            keys = ('frame_t', 'header_t', 'cmd_t', 'cmd_lin', 'cmd_ang', 'cmd_src')
            arrays = {k: meta[k] for k in keys}
        frames = np.load(frames_path, mmap_mode='r')
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None  # a damaged entry is rebuilt, not trusted
    if len(frames) < len(arrays['frame_t']):
        return None
    return _Read(
        frames=frames,
        **arrays,
        image_messages=int(info['image_messages']),
        malformed=int(info['malformed']),
        reasons=tuple((str(r), int(c)) for r, c in info['reasons']),
    )


def _frame_period(read: _Read, slices: list[slice]) -> tuple[float, str, np.ndarray, np.ndarray]:
    """(median frame period, which clock, all in-episode periods, the stamps used) of a bag.

    Header stamps when every frame has one and they increase (the camera's own rhythm, free
    of transport jitter); receive times otherwise.
    """
    header = read.header_t
    n = len(read.frame_t)
    use_header = n >= 2 and bool(np.isfinite(header).all()) and bool((np.diff(header) > 0).all())
    stamps = header if use_header else read.frame_t
    periods = [np.diff(stamps[s]) for s in slices if s.stop - s.start >= 2]
    if not periods:
        periods = [np.diff(stamps)] if n >= 2 else [np.zeros(0)]
    flat = np.concatenate(periods)
    dt = float(np.median(flat)) if flat.size else float('nan')
    return dt, 'header' if use_header else 'receive', flat, stamps


def load_recordings(
    bags: Sequence[str | Path],
    preprocess_cfg: PreprocessConfig,
    dataset_cfg: DatasetConfig,
    table: ActionTable,
    image_topic: str | None = None,
    cmd_topic: str | None = None,
    cache_dir: str | Path | None = None,
) -> Recordings:
    """Read, decode, fit, label and cut the bags into episodes and windows.

    Each bag is read once. Malformed frames are skipped and counted with their reasons. A bag
    that cannot be read, has no image or command topic, no decodable frame or only NaN
    commands is an error naming the bag and topic, and so is a result with no window.
    """
    if not bags:
        raise DatasetError('no bags given')
    cache = Path(cache_dir) if cache_dir is not None else None
    made = cache is not None and not cache.exists()
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    episodes: list[Episode] = []
    reports: list[BagReport] = []
    all_periods: list[np.ndarray] = []
    try:
        for bag_path in bags:
            report, bag_episodes, periods = _load_one(
                Path(bag_path), preprocess_cfg, dataset_cfg, table, image_topic, cmd_topic, cache
            )
            reports.append(report)
            episodes += bag_episodes
            all_periods.append(periods)
    except BaseException:
        if made and cache is not None:
            with contextlib.suppress(OSError):
                cache.rmdir()  # only when empty: complete entries of earlier bags stay
        raise
    short = short_episodes(episodes, dataset_cfg)
    index = windows(episodes, dataset_cfg)
    if len(index) == 0:
        lengths = ', '.join(f'{ep.bag} #{ep.index}: {len(ep)}' for ep in episodes[:10])
        raise DatasetError(
            f'no episode of {", ".join(str(b) for b in bags)} is long enough to train on '
            f'({dataset_cfg.min_frames} frames for {dataset_cfg.unit}, burn_in '
            f'{dataset_cfg.burn_in}, state {dataset_cfg.state}); episode lengths: '
            f'{lengths or "none"}'
        )
    _check_frame_rates(reports)
    histogram = np.zeros(len(table), np.int64)
    for ep in episodes:
        histogram += np.bincount(ep.labels, minlength=len(table))
    flat = np.concatenate(all_periods)
    return Recordings(
        episodes=tuple(episodes),
        windows=index,
        reports=tuple(reports),
        action_names=table.names,
        label_histogram=histogram,
        dt=float(np.median(flat)) if flat.size else float('nan'),
        short_episodes=short,
        dataset=dataset_cfg,
        preprocess=preprocess_cfg,
    )


MAX_DT_SPREAD = 1.25  # recordings whose frame periods differ more than this do not mix


def _check_frame_rates(reports: Sequence[BagReport]) -> None:
    """An LSTM learns dynamics at one frame rate (DESIGN §4) and the bundle stores one dt:
    recordings made at clearly different rates are refused rather than silently averaged."""
    rated = [(r.bag, r.dt) for r in reports if math.isfinite(r.dt) and r.dt > 0]
    if len(rated) < 2:
        return
    periods = [dt for _, dt in rated]
    if max(periods) > MAX_DT_SPREAD * min(periods):
        listing = ', '.join(f'{bag}: {dt * 1000:.1f} ms' for bag, dt in rated)
        raise DatasetError(
            f'recordings have different frame periods ({listing}); the policy learns at one '
            'rate: train on recordings of one rate, or re-record at the rate the robot runs'
        )


def _load_one(
    path: Path,
    preprocess_cfg: PreprocessConfig,
    dataset_cfg: DatasetConfig,
    table: ActionTable,
    image_topic: str | None,
    cmd_topic: str | None,
    cache: Path | None,
) -> tuple[BagReport, list[Episode], np.ndarray]:
    name = str(path)
    sha = _bag_sha(path)
    with bagio.open_bag(path) as bag:
        topics = bagio.find_topics(bag, image_topic, cmd_topic)
        read = None
        state = 'off'
        frames_path = meta_path = None
        if cache is not None:
            frames_path, meta_path = _cache_paths(
                cache, path, _cache_key(sha, topics, preprocess_cfg)
            )
            read = _load_cached(frames_path, meta_path)
            state = 'hit' if read is not None else 'written'
        if read is None:
            # Written under a temporary name, renamed when whole: a crash leaves no entry.
            tmp = (
                None if frames_path is None else frames_path.with_suffix(f'.{os.getpid()}.tmp.npy')
            )
            try:
                read = _read_bag(bag, topics, preprocess_cfg, tmp)
                if tmp is not None and frames_path is not None and meta_path is not None:
                    tmp.replace(frames_path)
                    _save_meta(meta_path, read)
            except BaseException as err:
                if tmp is not None:
                    with contextlib.suppress(OSError):
                        tmp.unlink()
                if frames_path is not None and meta_path is not None and not meta_path.exists():
                    with contextlib.suppress(OSError):
                        frames_path.unlink()  # frames without their meta file are no entry
                if isinstance(err, OSError) and diskspace.out_of_room(err):
                    raise StorageError(
                        f'frame cache {cache}: no room for the frames of {name}: {err}'
                    ) from err
                raise
            if tmp is not None and frames_path is not None and meta_path is not None:
                # Episodes get a read-only mapping: nothing downstream can write into the cache.
                read = read._replace(frames=np.load(frames_path, mmap_mode='r'))
    if read.malformed and len(read.frame_t) == 0:
        why = '; '.join(r for r, _ in read.reasons)
        raise DatasetError(
            f'bag {name}, topic {topics.image_topic}: none of {read.image_messages} frames '
            f'could be decoded: {why}'
        )
    if len(read.frame_t) == 0:
        raise DatasetError(f'bag {name}, topic {topics.image_topic}: no frames')
    if len(read.cmd_t) == 0:
        raise DatasetError(f'bag {name}, topic {topics.cmd_topic}: no commands')
    finite = np.isfinite(read.cmd_lin) & np.isfinite(read.cmd_ang)
    if not finite.any():
        raise DatasetError(
            f'bag {name}, topic {topics.cmd_topic}: all {len(read.cmd_t)} commands are NaN/inf'
        )
    n = len(read.frame_t)
    frames = read.frames[:n]
    labels, stats = align_labels(
        read.frame_t, read.cmd_t, read.cmd_lin, read.cmd_ang, dataset_cfg, table
    )
    takeover = takeover_flags(
        read.frame_t, read.cmd_t, read.cmd_lin, read.cmd_ang, read.cmd_src, dataset_cfg
    )
    slices = split_episodes(read.frame_t, dataset_cfg.gap, labels)
    dt, dt_source, periods, period_stamps = _frame_period(read, slices)
    episodes = [
        Episode(
            bag=name,
            index=i,
            stamps=read.frame_t[s],
            labels=labels[s],
            frames=frames[s],
            dt=median_period(period_stamps[s]) if s.stop - s.start >= 2 else dt,
            takeover=takeover[s],
        )
        for i, s in enumerate(slices)
    ]
    offsets = read.header_t - read.frame_t
    offsets = offsets[np.isfinite(offsets)]
    used = labels[labels >= 0]
    report = BagReport(
        bag=name,
        sha256=sha,
        topics=topics,
        image_messages=read.image_messages,
        frames=n,
        malformed=read.malformed,
        malformed_reasons=read.reasons,
        alignment=stats,
        episodes=len(episodes),
        short_episodes=short_episodes(episodes, dataset_cfg),
        dt=dt,
        dt_source=dt_source,
        clock_offset=float(np.median(offsets)) if offsets.size else None,
        label_histogram=tuple(int(c) for c in np.bincount(used, minlength=len(table))),
        cache=state,
        cache_file=str(frames_path) if frames_path is not None else None,
        takeover_frames=int(sum(np.count_nonzero(ep.flags) for ep in episodes)),
    )
    return report, episodes, periods
