"""Score a bundle on recordings the way the robot runs it: frame by frame, state carried.

``evaluate_bundle`` reads the bags with the bundle's own preprocessing and action table (the
labelling rules from the bundle's metadata where training stored them), then, for each episode
in time order, resets the runtime and steps ``Policy`` (LiteRT by default: the robot's runtime)
over every frame. It reports per-action precision/recall/F1, accuracy and the confusion matrix,
and, as the parity check on real data, how far the step runtime is from the sequence model
(``model.keras``) run over each whole episode as one sequence: max |Δprobability| and the share
of frames where both pick the same action.

Same frames as the robot: ``load_recordings`` caches ``fit_frame`` (crop + resize) output, and
``Policy.step_fitted`` finishes the preprocessing with ``normalize``: bit for bit the input
``Policy.step`` builds from the decoded frame.

``reset_every_frame`` is the memory ablation: the state is zeroed before every step, so the
policy sees one frame at a time (what the memory test compares against).

No TensorFlow at module level: the LiteRT path without the parity check never imports it.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from malpi_ros.config import DatasetConfig, PreprocessConfig, from_dict, to_dict
from malpi_ros.errors import BundleError, ConfigError
from malpi_ros.learn.dataset import Episode, Recordings, load_recordings
from malpi_ros.learn.metrics import (
    Agreement,
    ClassificationMetrics,
    agreement,
    classification_metrics,
)
from malpi_ros.progress import progress
from malpi_ros.runtime.bundle import Bundle
from malpi_ros.runtime.policy import BACKENDS, Policy

REPORT_FILE = 'report.json'
TEXT_FILE = 'report.txt'
CONFUSION_FILE = 'confusion.png'


@dataclass(frozen=True)
class FrameRecord:
    """One evaluated frame: where it is, what the human did and what the policy did.

    ``stamp`` is the bag's receive time of the image message (s), the clock the labels are
    aligned on; ``episode`` indexes ``EvaluationReport.episodes``.
    """

    episode: int
    bag: str
    index: int  # frame number within the episode
    stamp: float
    label: int
    action: int
    probabilities: np.ndarray


@dataclass(frozen=True, eq=False)
class EpisodeResult:
    """Per-frame results of one episode, as arrays (N frames, A actions)."""

    index: int
    bag: str
    bag_episode: int  # the episode's number within its bag
    stamps: np.ndarray  # (N,) float64 receive times, s
    labels: np.ndarray  # (N,) int64
    actions: np.ndarray  # (N,) int64, the step runtime's choice
    probabilities: np.ndarray  # (N, A) float32, the step runtime's
    sequence_probabilities: np.ndarray | None  # (N, A) float32 of model.keras, if checked
    step_ms: np.ndarray  # (N,) preprocess + model time of each step

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.actions == self.labels)) if len(self) else 0.0

    def to_dict(self, names: Sequence[str]) -> dict[str, Any]:
        out: dict[str, Any] = {
            'index': self.index,
            'bag': self.bag,
            'bag_episode': self.bag_episode,
            'frames': len(self),
            'accuracy': self.accuracy,
            'stamps': self.stamps.tolist(),
            'labels': self.labels.tolist(),
            'actions': self.actions.tolist(),
            'action_names': [names[a] for a in self.actions],
            'probabilities': self.probabilities.astype(float).tolist(),
        }
        if self.sequence_probabilities is not None:
            out['sequence_probabilities'] = self.sequence_probabilities.astype(float).tolist()
        return out


# Buckets of frames since the last reset (upper bounds, inclusive): memory that drifts shows
# as accuracy falling from the first buckets to the last.
SINCE_RESET_EDGES = (20, 50, 200)


@dataclass(frozen=True)
class SinceResetBucket:
    """Accuracy of the frames ``first..last`` steps after the last reset (1 = the first step;
    ``last`` None: no upper bound)."""

    first: int
    last: int | None
    correct: int
    frames: int

    @property
    def name(self) -> str:
        return f'{self.first}-{self.last}' if self.last is not None else f'{self.first}+'

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.frames if self.frames else None

    def to_dict(self) -> dict[str, Any]:
        return {'frames_since_reset': self.name, 'frames': self.frames, 'accuracy': self.accuracy}


def accuracy_since_reset(
    episodes: Sequence[EpisodeResult],
    reset_every_frame: bool,
    focus: Sequence[int] | None = None,
    edges: Sequence[int] = SINCE_RESET_EDGES,
) -> tuple[SinceResetBucket, ...]:
    """Accuracy by frames since the last reset (the state is zeroed at each episode start, or
    before every frame with ``reset_every_frame``), over the frames whose label is in ``focus``
    (e.g. the turns that need memory) or over all frames."""
    since = [
        np.ones(len(e), np.int64) if reset_every_frame else np.arange(1, len(e) + 1)
        for e in episodes
    ]
    steps = np.concatenate(since) if since else np.zeros(0, np.int64)
    labels = np.concatenate([e.labels for e in episodes]) if episodes else steps
    right = (
        np.concatenate([e.actions == e.labels for e in episodes])
        if episodes
        else np.zeros(0, bool)
    )
    chosen = np.isin(labels, list(focus)) if focus else np.ones(len(labels), bool)
    bounds = [0, *edges, None]
    out = []
    for low, high in itertools.pairwise(bounds):
        assert low is not None  # only the last bound is open
        inside = chosen & (steps > low) & ((steps <= high) if high is not None else True)
        out.append(SinceResetBucket(low + 1, high, int(right[inside].sum()), int(inside.sum())))
    return tuple(out)


@dataclass(frozen=True, eq=False)
class EvaluationReport:
    """What ``evaluate_bundle`` found; ``to_dict`` is report.json, ``format_text`` the terminal."""

    bundle: str
    bags: tuple[str, ...]
    backend: str
    reset_every_frame: bool
    action_names: tuple[str, ...]
    dataset: DatasetConfig
    episodes: tuple[EpisodeResult, ...]
    metrics: ClassificationMetrics
    parity: Agreement | None  # step runtime vs sequence model on every frame
    data_summary: str  # load_recordings' description of the bags
    seconds: float
    focus: tuple[int, ...] = ()  # actions whose frames the since-reset accuracy is about

    def since_reset(self) -> tuple[SinceResetBucket, ...]:
        return accuracy_since_reset(self.episodes, self.reset_every_frame, self.focus)

    @property
    def frames(self) -> int:
        return sum(len(e) for e in self.episodes)

    def frame_records(self) -> Iterator[FrameRecord]:
        """Every frame in evaluation order (episode by episode, time order within)."""
        for ep in self.episodes:
            for i in range(len(ep)):
                yield FrameRecord(
                    episode=ep.index,
                    bag=ep.bag,
                    index=i,
                    stamp=float(ep.stamps[i]),
                    label=int(ep.labels[i]),
                    action=int(ep.actions[i]),
                    probabilities=ep.probabilities[i],
                )

    def step_ms(self) -> dict[str, float]:
        times: Any = np.concatenate([e.step_ms for e in self.episodes]) if self.episodes else []
        if len(times) == 0:
            return {'median': 0.0, 'p99': 0.0}
        return {
            'median': float(np.median(times)),
            'p99': float(np.percentile(times, 99)),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            'bundle': self.bundle,
            'bags': list(self.bags),
            'backend': self.backend,
            'state': 'reset every frame' if self.reset_every_frame else 'carried per episode',
            'reset_every_frame': self.reset_every_frame,
            'actions': list(self.action_names),
            'dataset': to_dict(self.dataset),
            'frames': self.frames,
            'episodes_count': len(self.episodes),
            'metrics': self.metrics.to_dict(),
            'parity': None if self.parity is None else self.parity.to_dict(),
            'step_ms': self.step_ms(),
            'since_reset': {
                'focus': [self.action_names[a] for a in self.focus] or 'all frames',
                'buckets': [b.to_dict() for b in self.since_reset()],
            },
            'seconds': self.seconds,
            'stamp_clock': 'bag receive time of the image message (s)',
            'episodes': [e.to_dict(self.action_names) for e in self.episodes],
        }

    def format_text(self) -> str:
        state = (
            'state reset before every frame (ablation)'
            if self.reset_every_frame
            else 'state carried through each episode, reset at its start'
        )
        lines = [
            f'bundle {self.bundle}: {self.backend} runtime, {state}',
            self.data_summary,
            '',
            self.metrics.format_table(),
            '',
            'confusion matrix (rows: human label, columns: policy action):',
            *_matrix_lines(self.metrics.matrix, self.action_names),
            '',
        ]
        if self.parity is None:
            lines.append('parity with the sequence model: not checked')
        else:
            p = self.parity
            lines.append(
                'parity with the sequence model (model.keras, each episode one sequence'
                f'{", every frame its own" if self.reset_every_frame else ""}): '
                f'max |dp| {p.max_abs_diff:.2e}, mean {p.mean_abs_diff:.2e}, same action on '
                f'{p.action_agreement:.2%} of {p.frames} frames ({p.disagreements} differ)'
            )
        focus = ', '.join(self.action_names[a] for a in self.focus) or 'all'
        lines.append(f'accuracy by frames since the last reset ({focus} frames):')
        for bucket in self.since_reset():
            acc = bucket.accuracy
            lines.append(
                f'  {bucket.name:>8}: '
                + (f'{acc:.3f} of {bucket.frames}' if acc is not None else 'no frames')
            )
        times = self.step_ms()
        lines.append(
            f'step time (preprocess + model): median {times["median"]:.2f} ms, '
            f'p99 {times["p99"]:.2f} ms; evaluation took {self.seconds:.1f} s'
        )
        lines.append('per episode:')
        for ep in self.episodes:
            lines.append(
                f'  #{ep.index} {ep.bag} (episode {ep.bag_episode}): {len(ep)} frames, '
                f'accuracy {ep.accuracy:.3f}'
            )
        return '\n'.join(lines)


def _matrix_lines(matrix: np.ndarray, names: Sequence[str]) -> list[str]:
    width = max(max(len(n) for n in names), len(str(int(matrix.max(initial=0)))))
    header = ' ' * (width + 2) + ''.join(f' {n:>{width}}' for n in names)
    rows = [
        f'  {name:<{width}}' + ''.join(f' {int(v):>{width}}' for v in row)
        for name, row in zip(names, matrix, strict=True)
    ]
    return [header, *rows]


def dataset_config_of(bundle: Bundle) -> DatasetConfig:
    """The labelling rules the bundle was trained with (metadata ``extra.dataset``), else the
    defaults: frames must be labelled as training labelled them to be scored fairly."""
    stored = bundle.metadata.get('extra', {}).get('dataset')
    if stored is None:
        return DatasetConfig()
    try:
        return from_dict(DatasetConfig, stored)
    except ConfigError as err:
        raise BundleError(f'{bundle.path}: metadata field extra.dataset: {err}') from err


def evaluate_bundle(
    bundle: str | Path,
    bags: Sequence[str | Path],
    *,
    backend: str = 'litert',
    reset_every_frame: bool = False,
    parity: bool = True,
    image_topic: str | None = None,
    cmd_topic: str | None = None,
    dataset: DatasetConfig | None = None,
    cache_dir: str | Path | None = None,
    num_threads: int = 2,
    focus: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
    precision: str = 'fp32',
) -> EvaluationReport:
    """Run the bundle's step runtime over every episode of ``bags`` and score it.

    ``dataset`` None: the bundle's own labelling rules (see ``dataset_config_of``). Episodes
    of any length count (windows are a training matter). ``parity`` also runs the sequence
    model over each episode (imports TensorFlow). ``focus``: action names whose frames the
    accuracy by frames since the last reset is reported on (all frames when empty).
    ``precision``: the bundle's fp32 or int8 step model (LiteRT). Errors name the bag, topic or
    bundle file.
    """
    started = time.perf_counter()
    if backend not in BACKENDS:
        raise ConfigError(f'backend must be one of {", ".join(BACKENDS)}, got {backend!r}')
    policy = Policy.from_bundle(
        bundle, backend=backend, num_threads=num_threads, precision=precision
    )
    loaded = policy.bundle
    assert loaded is not None  # from_bundle sets it
    config = loaded.config
    _check_focus(focus, config.actions.names)
    rules = dataset if dataset is not None else dataset_config_of(loaded)
    # Every episode is scored, however short: windows only matter to training.
    recordings = load_recordings(
        bags,
        config.preprocess,
        replace(rules, seq_len=1, burn_in=0, stride=1),
        config.actions,
        image_topic=image_topic,
        cmd_topic=cmd_topic,
        cache_dir=cache_dir,
    )
    if log is not None:
        log(_describe_data(recordings))
    reference = None
    if parity:
        from malpi_ros.learn.sequence_runtime import (
            SequenceModel,  # TensorFlow: only for the check
        )

        reference = SequenceModel.from_file(loaded.keras_path, config.model)
    results = _run_episodes(recordings, policy, reference, reset_every_frame, log)
    labels = np.concatenate([r.labels for r in results])
    actions = np.concatenate([r.actions for r in results])
    metrics = classification_metrics(labels, actions, config.actions.names)
    check = None
    if reference is not None:
        check = agreement(
            np.concatenate([r.probabilities for r in results]),
            np.concatenate([r.sequence_probabilities for r in results]),  # type: ignore[misc]
        )
    return EvaluationReport(
        bundle=str(bundle),
        bags=tuple(str(b) for b in bags),
        backend=policy.backend,
        reset_every_frame=reset_every_frame,
        action_names=config.actions.names,
        dataset=rules,
        episodes=tuple(results),
        metrics=metrics,
        parity=check,
        data_summary=_describe_data(recordings),
        seconds=time.perf_counter() - started,
        focus=tuple(config.actions.names.index(name) for name in focus),
    )


def _check_focus(focus: Sequence[str], names: Sequence[str]) -> None:
    unknown = sorted(set(focus) - set(names))
    if unknown:
        raise ConfigError(f'focus actions {unknown} are not in the action table {list(names)}')


def _run_episodes(
    recordings: Recordings,
    policy: Policy,
    reference: Any,
    reset_every_frame: bool,
    log: Callable[[str], None] | None,
) -> list[EpisodeResult]:
    """Step every episode from a reset, the robot's way (and the sequence model beside it when
    ``reference`` is given); logs each episode's accuracy."""
    results = []
    preprocess = policy.config.preprocess
    episodes = progress(
        recordings.episodes, total=len(recordings.episodes), desc='evaluating', unit='episode'
    )
    for index, episode in enumerate(episodes):
        results.append(
            _run_episode(
                index, episode, policy, policy.step_fitted, reference, preprocess,
                reset_every_frame,
            )
        )  # fmt: skip
        if log is not None:
            log(
                f'episode {index} ({episode.bag} #{episode.index}): {len(episode)} frames, '
                f'accuracy {results[-1].accuracy:.3f}'
            )
    return results


def _describe_data(recordings: Recordings) -> str:
    """The bags' lines of ``Recordings.describe`` and a last line without training windows."""
    per_bag = recordings.describe().splitlines()[:-1]
    hist = ', '.join(
        f'{name} {count}'
        for name, count in zip(recordings.action_names, recordings.label_histogram, strict=True)
    )
    total = f'{len(recordings.episodes)} episodes, {recordings.frames} frames; labels: {hist}'
    return '\n'.join([*per_bag, total])


def _run_episode(
    index: int,
    episode: Episode,
    policy: Policy,
    step: Callable[[np.ndarray], Any],
    reference: Any,
    preprocess_cfg: PreprocessConfig,
    reset_every_frame: bool,
) -> EpisodeResult:
    n = len(episode)
    probs = np.zeros((n, len(policy.config.actions)), np.float32)
    actions = np.zeros(n, np.int64)
    step_ms = np.zeros(n, np.float64)
    policy.reset()  # a new episode is a new drive: the robot starts it from a zero state
    for i in range(n):
        if reset_every_frame:
            policy.reset()
        result = step(np.asarray(episode.frames[i]))
        probs[i] = result.probabilities
        actions[i] = result.action
        step_ms[i] = result.inference_ms
    sequence = None
    if reference is not None:
        sequence = reference.probabilities(
            np.asarray(episode.frames),
            preprocess_cfg,
            reset_every_frame=reset_every_frame,
            window=policy.config.window,
        )
    return EpisodeResult(
        index=index,
        bag=episode.bag,
        bag_episode=episode.index,
        stamps=np.asarray(episode.stamps, np.float64),
        labels=np.asarray(episode.labels, np.int64),
        actions=actions,
        probabilities=probs,
        sequence_probabilities=sequence,
        step_ms=step_ms,
    )


def write_report(report: EvaluationReport, out: str | Path) -> dict[str, Path]:
    """report.json, report.txt and confusion.png into ``out`` (created); returns the paths."""
    from malpi_ros.learn.plots import plot_confusion  # matplotlib: only when writing files

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {'json': out / REPORT_FILE, 'text': out / TEXT_FILE, 'confusion': out / CONFUSION_FILE}
    with paths['json'].open('w') as stream:
        json.dump(report.to_dict(), stream, allow_nan=False)  # compact: per-frame arrays
        stream.write('\n')
    paths['text'].write_text(report.format_text() + '\n')
    state = 'state reset every frame' if report.reset_every_frame else 'state carried'
    plot_confusion(
        report.metrics.matrix,
        report.action_names,
        paths['confusion'],
        title=f'{Path(report.bundle).name} on {report.frames} frames ({report.backend}, {state})',
    )
    return paths
