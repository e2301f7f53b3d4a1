"""Train a conv+LSTM policy from rosbag2 recordings and write it as a bundle (DESIGN §1-§4).

Steps: ``dataset.load_recordings`` (decode and fit every frame once, uint8, cached on disk),
split by episode (no validation frame is ever trained on), class weights from the training
labels, ``pipeline.make_dataset`` (the robot's ``image.normalize`` on every batch), fit the
sequence model, restore the best epoch, then score the validation windows and write the bundle
atomically — with ``history.csv``, ``learning_curves.png``, ``confusion.png`` and
``summary.txt`` inside it. Nothing is written at ``out`` unless the whole run succeeds, and an
existing bundle there is replaced only then.

Early stopping watches ``val_loss`` but never before ``min_epochs``: learning to remember starts
with a long plateau (DESIGN §4) that must not look like convergence.

``train.distribute`` spreads ``fit`` over devices or machines (``learn.distribute``): every
worker trains, only the chief writes the bundle, the reports and the backup. With a backup
directory (``learn.backup``) a killed run restarted with the same command resumes from its
last finished epoch; the backup is removed once the bundle is written.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import keras
import numpy as np

from malpi_ros import diskspace
from malpi_ros.allocator import keep_freed_memory
from malpi_ros.config import DatasetConfig, PolicyConfig, TrainConfig, to_dict
from malpi_ros.errors import BundleError, ConfigError, DatasetError
from malpi_ros.learn import distribute, plots
from malpi_ros.learn.backup import TrainingBackup, fingerprint
from malpi_ros.learn.dataset import (
    Episode,
    Recordings,
    Split,
    cache_bytes,
    load_recordings,
    split_by_episode,
    windows,
)
from malpi_ros.learn.export import save_bundle
from malpi_ros.learn.metrics import ClassificationMetrics, classification_metrics
from malpi_ros.learn.model import build_sequence_model, load_sequence_model
from malpi_ros.learn.pipeline import (
    ChunkSource,
    WindowSource,
    available_memory,
    class_weights,
    make_chunk_dataset,
    make_dataset,
    normalized_bytes,
    normalized_frames,
)
from malpi_ros.progress import format_duration
from malpi_ros.runtime.bundle import METADATA_FILE, load_bundle

# Adam's gradient-norm clip (the memory recipe): part of the recipe, not a setting.
CLIPNORM = 1.0

HISTORY_FILE = 'history.csv'
CURVES_FILE = 'learning_curves.png'
CONFUSION_FILE = 'confusion.png'
SUMMARY_FILE = 'summary.txt'
BUNDLE_EXTRA_BYTES = 2 << 20  # reports, plots and metadata beside the model files
GIB = 1 << 30


@dataclass(frozen=True)
class Prepared:
    """The recordings cut for training: split, batch sources and class weights."""

    recordings: Recordings
    split: Split
    train: WindowSource | ChunkSource
    val: WindowSource | ChunkSource | None  # None: no validation (val_fraction 0, or too short)
    weights: np.ndarray
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainResult:
    """What a run produced: the bundle and what is in its summary."""

    bundle: Path | None  # None on a worker that is not the chief
    history: dict[str, list[float]]
    metrics: dict[str, Any]
    summary: str
    confusion: np.ndarray = field(repr=False)
    seconds: float = 0.0


def _usable(episodes: Sequence[Episode], cfg: DatasetConfig) -> list[Episode]:
    """Episodes long enough to train on (``DatasetConfig.min_frames``)."""
    return [e for e in episodes if len(e) >= cfg.min_frames]


def prepare(
    recordings: Recordings,
    policy: PolicyConfig,
    train_cfg: TrainConfig,
) -> Prepared:
    """Split by episode, cut both sides into windows or chunk lanes (``DatasetConfig.state``),
    and weight the classes of the training labels."""
    cfg = recordings.dataset
    split = split_by_episode(recordings.episodes, train_cfg.val_fraction, train_cfg.seed)
    notes = [split.note]
    num_actions = len(policy.actions)
    once, note = normalize_once(split.train + split.val, train_cfg)
    notes.append(note)

    def source(
        episodes: Sequence[Episode], weights: np.ndarray, pieces: bool = True
    ) -> WindowSource | ChunkSource | None:
        if cfg.state == 'carried':
            usable = _usable(episodes, cfg)
            if not usable:
                return None
            # Validation runs every episode whole from its start: the robot's way.
            return ChunkSource(
                usable,
                cfg.seq_len,
                train_cfg.batch_size,
                cfg.burn_in,
                recordings.preprocess,
                weights,
                pieces,
                inputs=normalized_frames(usable, recordings.preprocess) if once else None,
            )
        index = windows(episodes, cfg)
        if len(index) == 0:
            return None
        return WindowSource(
            episodes,
            index,
            cfg.window,
            cfg.burn_in,
            recordings.preprocess,
            weights,
            inputs=normalized_frames(episodes, recordings.preprocess) if once else None,
        )

    unweighted = source(split.train, np.ones(num_actions, np.float32))
    if unweighted is None:
        raise DatasetError(
            f'no training episode of {cfg.min_frames} frames ({cfg.unit}) left after holding '
            f'out validation episodes ({split.note}); record longer drives or lower '
            '--val-fraction'
        )
    weights = np.ones(num_actions, np.float32)
    if train_cfg.class_weighting:
        # From the labels that carry loss: what the optimizer actually sees.
        weights = class_weights(unweighted.loss_labels(), num_actions, train_cfg.class_weight_cap)
    # Takeover frames weigh intervention_weight in training only: validation measures the
    # policy on every frame alike.
    train_source = replace(
        unweighted, weights=weights, intervention_weight=train_cfg.intervention_weight
    )
    val_source = source(split.val, weights, pieces=False) if split.val else None
    if split.val and val_source is None:
        notes.append(
            f'validation episodes are shorter than {cfg.min_frames} frames ({cfg.unit}): '
            'training without validation'
        )
    return Prepared(recordings, split, train_source, val_source, weights, tuple(notes))


def normalize_once(episodes: Sequence[Episode], train_cfg: TrainConfig) -> tuple[bool, str]:
    """Whether ``episodes``' frames are normalized once for the run (their float32 copy fits
    in ``normalized_frames_gib`` and half the available memory), and a note that says why."""
    needed = normalized_bytes(episodes)
    available = available_memory()  # read once: the note gives the figure decided on
    if needed <= min(train_cfg.normalized_frames_gib * GIB, available / 2):
        return True, f'frames normalized once for the run: {needed / GIB:.2f} GiB of float32'
    return False, (
        f'frames normalized per batch: their float32 copy ({needed / GIB:.2f} GiB) is over '
        f'normalized_frames_gib ({train_cfg.normalized_frames_gib:g}) or half the available '
        f'memory ({available / GIB:.1f} GiB)'
    )


class TimeLeft(keras.callbacks.Callback):
    """Logs after each epoch how long it took and the time left if every epoch runs (early
    stopping may end sooner): on a 2-core machine training is minutes, and a user deserves
    to know how many."""

    def __init__(self, epochs: int, log: Callable[[str], None]) -> None:
        super().__init__()
        self.epochs = epochs
        self.log = log
        self.started = time.perf_counter()

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.started = time.perf_counter()
        self.first: int | None = None

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.first is None:
            self.first = epoch  # a resumed run starts past epoch 0

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        done = epoch + 1
        per_epoch = (time.perf_counter() - self.started) / (done - (self.first or 0))
        left = per_epoch * (self.epochs - done)
        self.log(
            f'epoch {done}/{self.epochs}: {per_epoch:.0f} s an epoch, '
            f'at most {format_duration(left)} left'
        )


def tensorboard_logs(logdir: str | Path, now: float | None = None) -> keras.callbacks.Callback:
    """Keras' TensorBoard callback writing into ``logdir/<local time of the run>/`` (each run
    its own folder, so TensorBoard shows runs side by side): scalars per epoch, no graph and
    no profiling (the carried-state trainer is a subclassed model; tracing it costs time)."""
    run = time.strftime('%Y%m%d-%H%M%S', time.localtime(now))
    return keras.callbacks.TensorBoard(
        str(Path(logdir) / run), write_graph=False, profile_batch=0, update_freq='epoch'
    )


class StopAtTarget(keras.callbacks.Callback):
    """Ends training after the first epoch whose ``monitor`` reaches ``target`` (and says so):
    where the scored steps are the decisions that need memory, reaching the accuracy they need
    is the end, and the epochs after it cost minutes on a small machine for nothing."""

    def __init__(self, monitor: str, target: float, log: Callable[[str], None]) -> None:
        super().__init__()
        self.monitor = monitor
        self.target = target
        self.log = log
        self.stopped_epoch: int | None = None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is not None and float(value) >= self.target:
            self.stopped_epoch = epoch
            self.model.stop_training = True
            self.log(
                f'{self.monitor} {float(value):.4f} reached the target {self.target:g} at '
                f'epoch {epoch + 1}: training stops'
            )


class BestWeights(keras.callbacks.Callback):
    """Keeps the weights of the best epoch (lowest ``monitor``) and restores them at the end.

    In memory, not a file: the bundle is the only checkpoint that leaves the process, and it
    is written atomically after training.
    """

    def __init__(self, monitor: str) -> None:
        super().__init__()
        self.monitor = monitor
        self.best = math.inf
        self.best_epoch = -1
        self.weights: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is not None and math.isfinite(value) and value < self.best:
            self.best, self.best_epoch = float(value), epoch
            self.weights = self.model.get_weights()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.weights is not None:
            self.model.set_weights(self.weights)


def compile_model(
    model: keras.Model, learning_rate: float, jit_compile: bool | str = 'auto'
) -> keras.Model:
    """Adam with gradient clipping (an LSTM's gradients spike when it starts to remember);
    weighted accuracy, so burn-in steps (weight 0) do not count."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate, clipnorm=CLIPNORM),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        weighted_metrics=['accuracy'],
        jit_compile=jit_compile,
    )
    return model


def predict_windows(model: keras.Model, source: WindowSource, batch_size: int) -> np.ndarray:
    """int (N, W) argmax actions of the sequence model on every window of ``source``."""
    out = []
    for start in range(0, len(source), batch_size):
        rows = np.arange(start, min(start + batch_size, len(source)))
        x, _, _ = source.batch(rows)
        out.append(np.argmax(np.asarray(model(x, training=False)), axis=-1))
    return np.concatenate(out) if out else np.zeros((0, source.window), np.int64)


def _finite(value: Any) -> Any:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def _read_history(path: Path) -> dict[str, list[float]]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    keys = [k for k in (rows[0] if rows else {}) if k != 'epoch']
    return {k: [_csv_float(r[k]) for r in rows] for k in keys}


def _csv_float(text: str) -> float:
    """A CSVLogger cell: Keras writes 'NA' for a metric an epoch did not have (no validation)."""
    try:
        return float(text)
    except ValueError:
        return float('nan')


def train(
    bags: Sequence[str | Path],
    out: str | Path,
    policy: PolicyConfig | None = None,
    dataset: DatasetConfig | None = None,
    train_cfg: TrainConfig | None = None,
    *,
    image_topic: str | None = None,
    cmd_topic: str | None = None,
    cache_dir: str | Path | None = None,
    backup_dir: str | Path | None = None,
    verbose: int | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    log: Callable[[str], None] = print,
    warm_start: str | Path | None = None,
) -> TrainResult:
    """Train on ``bags`` and write the bundle at ``out``; see the module docstring.

    ``warm_start``: a bundle of the same model whose weights training starts from (the DAgger
    rounds retrain on everything so far from the previous round's policy); BundleError when
    its model differs. The optimizer starts afresh.

    ``backup_dir``: where the chief backs up every finished epoch (None: no backup).
    ``verbose``: Keras' (1 progress bar, 2 a line per epoch, 0 silent); default 1 on a
    terminal, 2 otherwise. Raises BagError/DatasetError naming the bag and topic for bad input,
    before anything is written. A worker that is not the chief trains and returns a result
    whose ``bundle`` is None: it writes nothing at ``out``. Sets this process's allocator to
    reuse freed memory (``allocator.keep_freed_memory``: 1.5-2x faster epochs on 2 cores).
    """
    log(keep_freed_memory())
    policy = policy or PolicyConfig()
    dataset = window_dataset(policy, dataset or DatasetConfig(), log)
    train_cfg = train_cfg or TrainConfig()
    # First: a multi-worker strategy must exist before TensorFlow runs anything here.
    strategy = distribute.make_strategy(train_cfg.distribute)
    where = distribute.placement(strategy)
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    out = Path(out)
    started = time.perf_counter()
    bag_paths = [Path(b) for b in bags]
    if any(out.resolve() == b.resolve() for b in bag_paths):
        raise ConfigError(f'--out {out} is one of the input bags; training never writes there')
    _check_out(out)
    if not where.chief:
        # Each worker its own frame cache; logs (TensorBoard) come from the chief alone.
        cache_dir = Path(cache_dir) / f'worker-{where.worker}' if cache_dir is not None else None
        callbacks = [c for c in callbacks if not isinstance(c, keras.callbacks.TensorBoard)]
    keras.utils.set_random_seed(train_cfg.seed)
    with distribute.scope(strategy):
        model = build_sequence_model(policy.model)  # now: its size is part of the room needed
        if warm_start is not None:
            model.set_weights(_warm_weights(Path(warm_start), policy))
            log(f'warm start from {warm_start}')
    check_room(bag_paths, out, policy, model, image_topic, cmd_topic, cache_dir, backup_dir)
    prepared = _load(bag_paths, policy, dataset, train_cfg, image_topic, cmd_topic, cache_dir, log)
    if strategy is not None:
        log(distribute.check_split(prepared.train, where, train_cfg.batch_size))
    # A full disk while writing reports or the bundle: one line, and the old bundle untouched.
    full_disk = diskspace.full_disk_is_one_line(f'--out {out} (the previous bundle is kept)')
    with full_disk, tempfile.TemporaryDirectory(prefix='malpi_train_') as staging_dir:
        staging = Path(staging_dir)
        backup = (
            _backup(Path(backup_dir), where, policy, dataset, train_cfg, prepared, log)
            if backup_dir is not None
            else None
        )
        fit_model, history, best, fit_seconds = _fit(
            model, prepared, policy, dataset, train_cfg, staging / HISTORY_FILE, verbose,
            [TimeLeft(train_cfg.epochs, log), *callbacks], strategy, where, backup, log,
        )  # fmt: skip
        if not where.chief:
            log(f'{where.describe()}: training done; the chief writes the bundle at {out}')
            return TrainResult(
                None, history, {}, '', np.zeros((0, 0), np.int64), time.perf_counter() - started
            )
        scored_name = 'validation' if prepared.val is not None else 'training (no validation)'
        true, pred = _score(fit_model, prepared, policy, train_cfg.batch_size)
        scores = classification_metrics(true, pred, policy.actions.names)
        metrics = _metrics(
            scores, scored_name, history, best, prepared, policy, dataset,
            train_cfg.target_val_accuracy,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        summary = _summary(prepared, policy, dataset, train_cfg, metrics, fit_seconds, seconds)
        _write_reports(staging, out.name, summary, history, scores.matrix, policy, scored_name)
        save_bundle(
            out,
            model,
            policy,
            dt=float(prepared.recordings.dt),
            # The longest stretch the gradient reached back over: a chunk, or a window (its
            # last bptt frames where set).
            seq_len=dataset.seq_len
            if dataset.state == 'carried'
            else dataset.bptt or dataset.window,
            sources=_sources(prepared.recordings),
            metrics=json.loads(json.dumps(metrics)),
            extra={
                'dataset': to_dict(dataset),
                'train': {**to_dict(train_cfg), 'clipnorm': CLIPNORM},
                'split': prepared.split.note,
                'notes': list(prepared.notes),
            },
            extra_files={
                name: staging / name
                for name in (HISTORY_FILE, CURVES_FILE, CONFUSION_FILE, SUMMARY_FILE)
            },
        )
        if backup is not None:
            backup.remove()  # the bundle holds the run now
    log(summary)
    return TrainResult(
        out, history, metrics, summary, scores.matrix, time.perf_counter() - started
    )


def _warm_weights(bundle: Path, policy: PolicyConfig) -> list[np.ndarray]:
    """The sequence model's weights of ``bundle``, which must hold ``policy``'s model."""
    loaded = load_bundle(bundle)
    if loaded.config.model != policy.model:
        raise BundleError(
            f'warm start: {bundle} holds another model ({loaded.config.model}); '
            f'training builds {policy.model}'
        )
    return list(load_sequence_model(loaded.keras_path, policy.model).get_weights())


def _check_out(out: Path) -> None:
    """save_bundle refuses a non-bundle ``out`` too, but only after training: say it first."""
    if out.exists() and not (
        out.is_dir() and (not any(out.iterdir()) or (out / METADATA_FILE).is_file())
    ):
        raise ConfigError(f'--out {out} exists and is not a bundle; not replacing it')


def _load(
    bag_paths: Sequence[Path],
    policy: PolicyConfig,
    dataset: DatasetConfig,
    train_cfg: TrainConfig,
    image_topic: str | None,
    cmd_topic: str | None,
    cache_dir: str | Path | None,
    log: Callable[[str], None],
) -> Prepared:
    """Read the bags (through the frame cache) and cut them for training; logs what it found."""
    recordings = load_recordings(
        bag_paths, policy.preprocess, dataset, policy.actions, image_topic, cmd_topic, cache_dir
    )
    if not (math.isfinite(recordings.dt) and recordings.dt > 0):
        raise DatasetError(
            f'cannot measure the frame period of {", ".join(map(str, bag_paths))}: '
            f'got dt={recordings.dt}'
        )
    log(recordings.describe())
    prepared = prepare(recordings, policy, train_cfg)
    log('\n'.join(prepared.notes))
    names = policy.actions.names
    log(
        'class weights: '
        + ', '.join(f'{n} {w:.2f}' for n, w in zip(names, prepared.weights, strict=True))
    )
    return prepared


def _fit(
    model: keras.Model,
    prepared: Prepared,
    policy: PolicyConfig,
    dataset: DatasetConfig,
    train_cfg: TrainConfig,
    history_path: Path,
    verbose: int,
    callbacks: Sequence[keras.callbacks.Callback],
    strategy: Any = None,
    where: distribute.Placement = distribute.ONE_PROCESS,
    backup: _Backup | None = None,
    log: Callable[[str], None] = print,
) -> tuple[keras.Model, dict[str, list[float]], BestWeights, float]:
    """Keras ``fit`` with the best epoch kept, early stopping after ``min_epochs`` and the
    history in ``history_path``: (the model fit ran on, history, best, seconds). With a
    ``backup``, every finished epoch is backed up and a backed-up run resumes."""
    with distribute.scope(strategy):
        fit_model, train_ds, val_ds = _fit_setup(
            model, prepared, policy, dataset, train_cfg, strategy, where, log
        )
        if strategy is None:
            build_before_fit(fit_model, train_ds)
    monitor = 'val_loss' if val_ds is not None else 'loss'
    best = BestWeights(monitor)
    stopper = keras.callbacks.EarlyStopping(
        monitor=monitor,
        patience=train_cfg.patience,
        start_from_epoch=min(train_cfg.min_epochs, train_cfg.epochs),
    )
    targets: list[keras.callbacks.Callback] = []
    if train_cfg.target_val_accuracy is not None:
        monitor_accuracy = 'val_accuracy' if val_ds is not None else 'accuracy'
        targets.append(StopAtTarget(monitor_accuracy, train_cfg.target_val_accuracy, log))
    resuming: list[keras.callbacks.Callback] = []
    csv_path = history_path
    if backup is not None:
        saver = TrainingBackup(
            backup.dir, writer=backup.writer, settings=backup.settings, best=best,
            stopper=stopper, log=log,
        )  # fmt: skip
        if where.chief:
            saver.keep_history()
            csv_path = saver.history_path  # appended to across restarts
            csv_path.parent.mkdir(parents=True, exist_ok=True)
        resuming.append(saver)  # last: it saves what the others did with the epoch
    fit_callbacks = [
        best,
        stopper,
        *targets,
        keras.callbacks.CSVLogger(str(csv_path), append=csv_path != history_path),
        *callbacks,
        *resuming,
    ]
    fit_started = time.perf_counter()
    with warnings.catch_warnings():
        # The carried-state datasets leave their length unknown (the chunk plan changes every
        # epoch), so Keras finds each epoch's end by running out of data, as intended.
        warnings.filterwarnings('ignore', message='Your input ran out of data')
        fit_model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=train_cfg.epochs,
            callbacks=fit_callbacks,
            verbose=verbose,
            shuffle=False,  # the dataset shuffles itself, seeded
        )
    if csv_path != history_path:
        shutil.copyfile(csv_path, history_path)
    return fit_model, _read_history(history_path), best, time.perf_counter() - fit_started


@dataclass(frozen=True)
class _Backup:
    """Where a run backs up its epochs, and the settings that backup is valid for."""

    dir: Path
    settings: str
    writer: bool  # the chief

    def remove(self) -> None:
        if self.writer:
            shutil.rmtree(self.dir, ignore_errors=True)


def _backup(
    backup_dir: Path,
    where: distribute.Placement,
    policy: PolicyConfig,
    dataset: DatasetConfig,
    train_cfg: TrainConfig,
    prepared: Prepared,
    log: Callable[[str], None],
) -> _Backup:
    """The run's backup: valid for the same model, data and recipe (the epoch count may grow
    between restarts; the recordings are named by their hashes)."""
    settings = {
        'policy': to_dict(policy),
        'dataset': to_dict(dataset),
        'train': {**to_dict(train_cfg), 'epochs': None},
        'bags': [r.sha256 for r in prepared.recordings.reports],
        'replicas': where.total_replicas,
    }
    if where.chief:
        log(f'backup of every finished epoch: {backup_dir} (removed once the bundle is written)')
    return _Backup(backup_dir, fingerprint(settings), where.chief)


def _metrics(
    scores: ClassificationMetrics,
    scored_name: str,
    history: dict[str, list[float]],
    best: BestWeights,
    prepared: Prepared,
    policy: PolicyConfig,
    dataset: DatasetConfig,
    target: float | None = None,
) -> dict[str, Any]:
    """The bundle's ``metrics``: scores on the held-out episodes and how training went."""
    names = policy.actions.names
    accuracies = history.get('val_accuracy') or history.get('accuracy') or []
    reached = [i + 1 for i, a in enumerate(accuracies) if target is not None and a >= target]
    metrics = {
        'scored_on': scored_name,
        'accuracy': scores.accuracy if scores.total else None,
        'best_epoch': best.best_epoch + 1 if best.weights is not None else None,
        'best_' + best.monitor: _finite(best.best) if best.weights is not None else None,
        'epochs_run': len(history.get('loss', [])),
        'target_val_accuracy': target,
        'target_reached_epoch': reached[0] if reached else None,
        'per_class': scores.to_dict()['per_class'],
        'confusion': scores.matrix.tolist(),
        'class_weights': {n: float(w) for n, w in zip(names, prepared.weights, strict=True)},
        'training_state': dataset.state,
        'train_windows': len(prepared.train),
        'val_windows': len(prepared.val) if prepared.val is not None else 0,
        'val_episodes': len(prepared.val.episodes) if prepared.val is not None else 0,
    }
    for key in ('loss', 'accuracy', 'val_loss', 'val_accuracy'):
        if history.get(key) and best.best_epoch >= 0:
            metrics[f'{key}_at_best'] = _finite(history[key][best.best_epoch])
    return metrics


def _write_reports(
    staging: Path,
    name: str,
    summary: str,
    history: dict[str, list[float]],
    matrix: np.ndarray,
    policy: PolicyConfig,
    scored_name: str,
) -> None:
    """summary.txt, the learning curves and the confusion matrix, for the bundle."""
    (staging / SUMMARY_FILE).write_text(summary)
    plots.plot_history(history, staging / CURVES_FILE, title=f'{name}')
    plots.plot_confusion(
        matrix,
        policy.actions.names,
        staging / CONFUSION_FILE,
        title=f'{name}: {scored_name} windows (after burn-in)',
    )


def _sources(recordings: Recordings) -> list[dict[str, Any]]:
    """Each bag trained on, with its sha256, topics and frame count (the bundle's provenance)."""
    return [
        {
            'path': r.bag,
            'sha256': r.sha256,
            'image_topic': r.topics.image_topic,
            'cmd_topic': r.topics.cmd_topic,
            'frames': r.frames,
        }
        for r in recordings.reports
    ]


def window_dataset(
    policy: PolicyConfig, dataset: DatasetConfig, log: Callable[[str], None]
) -> DatasetConfig:
    """The training windows a policy of the window kind runs on: K frames from a zero state,
    the last one scored, one starting at every frame. Other policies: ``dataset`` as given."""
    if not policy.window:
        return dataset
    windows = replace(
        dataset, state='zero', burn_in=policy.window - 1, seq_len=1, stride=1, bptt=0
    )
    if windows != dataset:
        log(
            f'window policy of {policy.window} frames: training on windows of '
            f'{policy.window} frames from a zero state, the last scored, one per frame'
        )
    return windows


def _fit_setup(
    model: keras.Model,
    prepared: Prepared,
    policy: PolicyConfig,
    dataset: DatasetConfig,
    train_cfg: TrainConfig,
    strategy: Any = None,
    where: distribute.Placement = distribute.ONE_PROCESS,
    log: Callable[[str], None] = print,
) -> tuple[keras.Model, Any, Any]:
    """(the model ``fit`` runs on, training batches, validation batches or None): the
    sequence model itself on windows (``zero``; a ``WindowTrainer`` around it under a
    strategy), or a ``CarriedStateTrainer`` around it on chunk lanes (``carried``); either way
    training updates ``model``'s weights. Under a strategy each worker's batches are its own
    share of the episodes, each replica's part of the global batch."""
    xla = train_cfg.xla and distribute.gpu_present()
    if train_cfg.xla and not xla:
        log('xla: no GPU here, training without XLA (it pays off on a GPU only)')
    if dataset.state == 'carried':
        from malpi_ros.learn.carried_state import CarriedStateTrainer

        lanes = train_cfg.batch_size // where.total_replicas
        fit_model: keras.Model = CarriedStateTrainer(policy.model, model, lanes)
        fit_model.compile(
            optimizer=keras.optimizers.Adam(train_cfg.learning_rate, clipnorm=CLIPNORM),
            jit_compile=xla,
        )
        make: Callable[..., Any] = make_chunk_dataset
        args: dict[str, Any] = {}
    else:
        cut = dataset.forward_only
        fit_model = (
            model
            if strategy is None and not cut
            else distribute.WindowTrainer(model, policy.model, cut)
        )
        compile_model(fit_model, train_cfg.learning_rate, jit_compile=xla)
        make = make_dataset
        args = {'batch_size': train_cfg.batch_size}
    if strategy is not None:
        make = functools.partial(distribute.distributed_dataset, strategy, where=where)
        args = {'batch_size': train_cfg.batch_size}
    train_ds = make(prepared.train, shuffle=True, seed=train_cfg.seed, **args)
    val_ds = (
        make(prepared.val, shuffle=False, seed=train_cfg.seed, **args)
        if prepared.val is not None
        else None
    )
    return fit_model, train_ds, val_ds


def build_before_fit(fit_model: keras.Model, train_ds: Any) -> None:
    """Create the optimizer's variables (and the compiled loss and metrics) before ``fit``.

    Without a strategy Keras defers this to the first trace of the train step, and a
    ``tf.function`` whose first trace creates variables is traced a second time: one trace
    of the step fewer per run (under a strategy ``ReplicaFit`` builds first already). Built
    from the batch shapes, so no batch is drawn (the chunk plan's generator is not advanced)
    and the variables start as zeros as before: the run is the same number for number."""
    fit_model._symbolic_build(data_batch=train_ds.element_spec)


def _score(
    fit_model: keras.Model, prepared: Prepared, policy: PolicyConfig, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, argmax actions) of the scored steps of the validation data (the training
    data without validation): after the burn-in of each window (``zero``), or over whole
    episodes with the state carried from their start, after the burn-in (``carried``)."""
    scored = prepared.val if prepared.val is not None else prepared.train
    burn = scored.burn_in
    if isinstance(scored, ChunkSource):
        from malpi_ros.learn.carried_state import predict_episodes

        units = policy.model.lstm_units
        pred = predict_episodes(fit_model.net, scored.episodes, scored.preprocess, units)
        true = [e.labels[burn:] for e in scored.episodes]
        return np.concatenate(true), np.concatenate([p[burn:] for p in pred])
    pred_windows = predict_windows(fit_model, scored, batch_size)
    true_windows = scored.labels(np.arange(len(scored)))
    return true_windows[:, burn:].ravel(), pred_windows[:, burn:].ravel()


def bundle_bytes(model: keras.Model) -> int:
    """About what a bundle of ``model`` takes on disk: float32 weights in model.keras and
    again in step.tflite, plus room for the reports and plots."""
    return 2 * 4 * int(model.count_params()) + BUNDLE_EXTRA_BYTES


def check_room(
    bags: Sequence[Path],
    out: Path,
    policy: PolicyConfig,
    model: keras.Model,
    image_topic: str | None,
    cmd_topic: str | None,
    cache_dir: str | Path | None,
    backup_dir: str | Path | None = None,
) -> None:
    """Refuse to start when the frame cache, the bundle and the backup will not fit (one
    line, no hour of training first). The cache is counted only for bags it does not hold
    yet; the backup holds weights, Adam's two moments and the best weights, twice while an
    epoch's files replace the last."""
    needs: dict[str | Path, int] = {out: bundle_bytes(model)}
    if backup_dir is not None:
        needs[Path(backup_dir)] = 2 * 4 * 4 * int(model.count_params())
    if cache_dir is not None:
        cache = Path(cache_dir)
        needs[cache] = cache_bytes(bags, policy.preprocess, image_topic, cmd_topic, cache)
    diskspace.check_room(needs, 'the frame cache, the bundle and the backup')


def _summary(
    prepared: Prepared,
    policy: PolicyConfig,
    dataset: DatasetConfig,
    train_cfg: TrainConfig,
    metrics: dict[str, Any],
    fit_seconds: float,
    seconds: float,
) -> str:
    rec = prepared.recordings
    names = policy.actions.names
    m = policy.model
    lines = [
        'malpi-ros train summary',
        '',
        'data:',
        *(f'  {line}' for line in rec.describe().splitlines()),
        f'  frame period dt: {rec.dt * 1000:.1f} ms',
        '',
        'split:',
        *(f'  {note}' for note in prepared.notes),
        f'  training: {len(prepared.split.train)} episodes, {len(prepared.train)} windows; '
        f'validation: {len(prepared.split.val)} episodes, {metrics["val_windows"]} windows',
        (
            f'  state carried across chunks of {dataset.seq_len} frames (truncated BPTT, '
            f'{train_cfg.batch_size} lanes); burn-in {dataset.burn_in} steps without loss after '
            'each zero state'
            if dataset.state == 'carried'
            else f'  window: {dataset.window} frames from a zero state (burn-in '
            f'{dataset.burn_in} without loss + {dataset.seq_len} scored), stride {dataset.stride}'
        ),
        '',
        'class weights (training labels after burn-in'
        + (', capped)' if train_cfg.class_weighting else '; weighting off)')
        + ':',
        '  ' + ', '.join(f'{n} {w:.2f}' for n, w in zip(names, prepared.weights, strict=True)),
        '',
        'model:',
        f'  input {m.height}x{m.width}x{m.channels} ({policy.preprocess.normalization}), convs '
        + ', '.join(f'{c.filters}@{c.kernel}x{c.kernel}/{c.stride}' for c in m.convs)
        + f', LSTM {m.lstm_units} ({m.lstm_activation}), {m.num_actions} actions',
        f'  Adam lr {train_cfg.learning_rate:g} (clipnorm {CLIPNORM:g}), batch '
        f'{train_cfg.batch_size}, seed {train_cfg.seed}',
        '',
        'training:',
        f'  epochs run: {metrics["epochs_run"]} of {train_cfg.epochs}; '
        + (
            f'best epoch {metrics["best_epoch"]} (weights restored from it)'
            if metrics['best_epoch'] is not None
            else 'no epoch had a finite loss (the last weights are kept)'
        ),
        f'  fit time: {fit_seconds:.1f} s, total {seconds:.1f} s',
    ]
    if train_cfg.target_val_accuracy is not None:
        epoch = metrics['target_reached_epoch']
        lines.insert(
            -1,
            f'  target validation accuracy {train_cfg.target_val_accuracy:g}: '
            + (f'reached at epoch {epoch}' if epoch else 'not reached'),
        )
    for key in ('loss', 'accuracy', 'val_loss', 'val_accuracy'):
        value = metrics.get(f'{key}_at_best')
        if value is not None:
            lines.append(f'  {key} at best epoch: {value:.4f}')
    unit = 'episodes, state carried' if dataset.state == 'carried' else 'windows'
    lines += ['', f'scored on {metrics["scored_on"]} {unit} (steps after burn-in):']
    acc = metrics['accuracy']
    lines.append(f'  accuracy: {acc:.4f}' if acc is not None else '  accuracy: n/a')
    for name, row in metrics['per_class'].items():
        lines.append(
            f'  {name:>10}: precision {row["precision"]:.3f}, recall {row["recall"]:.3f}, '
            f'support {row["support"]}'
        )
    return '\n'.join(lines) + '\n'
