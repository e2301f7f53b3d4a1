"""The int8 step model: ``malpi-ros export BUNDLE --int8`` adds ``step_int8.tflite`` to a bundle.

Why: at batch 1 the step is bound by streaming the LSTM's input kernel from memory (DESIGN §2);
int8 weights are a quarter of the bytes. Whether the smaller model still makes the same decisions
— and keeps the memory — is measured here, at export, and stored in the bundle.

How:
1. The bundle's own training recordings (metadata ``sources``; each bag's sha256 must match)
   are read with the labelling rules it was trained with, and split into training and
   validation episodes exactly as training split them (``extra.train`` val_fraction, seed).
2. Representative data for full-integer quantization: frames of training episodes *and* the
   LSTM states the trained sequence model reaches on them (``model.build_state_model``: each
   episode run from a zero state, as the robot runs a drive), sampled at random.
3. Full-integer quantization (int8 weights and activations, the state included; float32
   inputs and outputs, so the runtime feeds it like the fp32 model). If it chooses the fp32
   model's action on fewer than ``min_agreement`` (0.99) of the held-out frames, dynamic-range
   quantization (int8 weights, float activations and state) is the fallback.
4. Agreement is measured the robot's way: both LiteRT models stepped frame by frame over each
   held-out episode (validation episodes, plus ``held_out`` bags), the state carried from the
   episode's start. The same-action fraction and the max probability difference are printed and
   stored in the bundle with the file's sha256 (``bundle.add_model_file``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from malpi_ros.config import PolicyConfig, TrainConfig, from_dict
from malpi_ros.errors import BundleError, ConfigError, DatasetError
from malpi_ros.learn.carried_state import over_chunks
from malpi_ros.learn.dataset import Episode, load_recordings, split_by_episode
from malpi_ros.learn.evaluate import dataset_config_of
from malpi_ros.learn.export import convert_step_model
from malpi_ros.learn.metrics import Agreement, agreement
from malpi_ros.learn.model import (
    SEQUENCE_INPUT,
    build_state_model,
    build_step_model,
    load_sequence_model,
)
from malpi_ros.runtime import image
from malpi_ros.runtime.bundle import (
    INT8_FILE,
    KERAS_FILE,
    QUANTIZATIONS,
    Bundle,
    add_model_file,
    load_bundle,
)
from malpi_ros.runtime.litert import LiteRTStep
from malpi_ros.runtime.policy import Policy

MODES = ('auto', *QUANTIZATIONS)  # auto: full_integer, dynamic_range if it agrees too little
MIN_AGREEMENT = 0.99  # same action as fp32 on >= 99% of held-out frames (issue 14's target)
SAMPLES = 300  # representative (frame, h, c) triples; calibration takes ~1 s per 100 here
MAX_CALIBRATION_FRAMES = 20_000  # frames the sequence model runs over to find the states
CHUNK = 200  # frames per sequence-model call (a chunk of 120x120 frames is ~35 MB)
MIN_LABEL_FRAMES = 10  # an action label with this many held-out frames is scored on its own


@dataclass(frozen=True)
class Measured:
    """int8 against fp32 on held-out frames: over all frames, and per action label."""

    overall: Agreement
    by_label: dict[str, tuple[int, float]]  # label -> (frames, same-action fraction)

    @property
    def score(self) -> float:
        """The lowest same-action fraction, over all frames and over the frames of each action
        label with at least ``MIN_LABEL_FRAMES``: the rare turns at a fork are where memory
        matters, and 99% over all frames can hide losing them (seen in the memory test:
        full-integer agreed on 99.75% of all frames and on 15 of 17 'right' frames, and lost 6
        of 100 junctions on other drives)."""
        counted = [same for frames, same in self.by_label.values() if frames >= MIN_LABEL_FRAMES]
        return min([self.overall.action_agreement, *counted])

    def fields(self) -> dict[str, Any]:
        """What the metadata stores."""
        return {
            'frames': self.overall.frames,
            'same_action': self.overall.action_agreement,
            'max_prob_diff': self.overall.max_abs_diff,
            'mean_prob_diff': self.overall.mean_abs_diff,
            'by_label': {
                name: {'frames': frames, 'same_action': same}
                for name, (frames, same) in self.by_label.items()
            },
            'score': self.score,
        }


@dataclass(frozen=True)
class Int8Export:
    """What ``export_int8`` wrote and measured (also stored in the bundle's metadata)."""

    bundle: Path
    quantization: str
    agreement: Measured
    held_out: str  # which frames the agreement is on
    episodes: int
    tried: tuple[dict[str, Any], ...]
    fp32_bytes: int
    int8_bytes: int

    def info(self, min_agreement: float, representative: dict[str, Any]) -> dict[str, Any]:
        """The ``files.step_int8.tflite`` entry's fields besides sha256, bytes and precision."""
        return {
            'quantization': self.quantization,
            'min_agreement': min_agreement,
            'agreement': {
                'on': self.held_out,
                'episodes': self.episodes,
                **self.agreement.fields(),
            },
            'tried': list(self.tried),
            'representative': representative,
        }

    def format_text(self) -> str:
        a = self.agreement.overall
        labels = ', '.join(
            f'{name} {same:.4f} of {frames}'
            for name, (frames, same) in self.agreement.by_label.items()
        )
        return '\n'.join(
            [
                f'int8 step model: {self.bundle / INT8_FILE} ({self.quantization})',
                f'  size: {self.int8_bytes} bytes, fp32 {self.fp32_bytes} bytes '
                f'({self.fp32_bytes / self.int8_bytes:.2f}x smaller)',
                f'  agreement with fp32 on {a.frames} frames of {self.episodes} episodes '
                f'({self.held_out}), state carried: same action {a.action_agreement:.4f} '
                f'({a.disagreements} differ), max probability difference {a.max_abs_diff:.4f}, '
                f'mean {a.mean_abs_diff:.5f}',
                f'  by the label of the frame: {labels}; score (the lowest of these with >= '
                f'{MIN_LABEL_FRAMES} frames, and all frames) {self.agreement.score:.4f}',
            ]
        )


def state_trajectories(
    state_model: Any, episodes: Sequence[Episode], config: PolicyConfig
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per episode, (h, c) *before* each frame, each (N, units): the state the robot holds when
    that frame arrives, running the episode from a zero state (the first frame's is zero)."""
    units = config.model.lstm_units
    state = tf.TensorSpec((1, units), tf.float32)

    # One graph for every chunk length: called eagerly, the RNN stepped in Python (minutes for
    # a few thousand frames here); traced once with T unknown, a while loop (seconds).
    @tf.function(
        input_signature=[tf.TensorSpec((1, None, *config.model.input_shape), tf.float32),
                         state, state]
    )  # fmt: skip
    def run(x: Any, h: Any, c: Any) -> Any:
        return state_model({SEQUENCE_INPUT: x, 'h': h, 'c': c}, training=False)

    def step(x: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]:
        after = run(x, h, c).numpy()[0]
        before = np.concatenate([np.concatenate([h, c], axis=1), after[:-1]])
        return before, after[-1:, :units], after[-1:, units:]

    out = []
    for ep in episodes:
        stacked = np.concatenate(over_chunks(step, ep, config.preprocess, units, CHUNK))
        out.append((stacked[:, :units], stacked[:, units:]))
    return out


def representative_samples(
    bundle: Bundle,
    sequence_model: Any,
    episodes: Sequence[Episode],
    count: int = SAMPLES,
    seed: int = 0,
) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """``count`` (frame, h, c) inputs of the step model drawn at random from ``episodes``, each
    with the state the trained model reaches there; and a description for the metadata.

    Episodes are taken in a random order until ``MAX_CALIBRATION_FRAMES`` frames are covered.
    """
    if not episodes:
        raise DatasetError('no training episode to draw representative data from')
    rng = np.random.default_rng(seed)
    chosen: list[Episode] = []
    for i in rng.permutation(len(episodes)):
        if chosen and sum(map(len, chosen)) >= MAX_CALIBRATION_FRAMES:
            break
        chosen.append(episodes[int(i)])
    config = bundle.config
    states = state_trajectories(build_state_model(config.model, sequence_model), chosen, config)
    where = [(e, f) for e, ep in enumerate(chosen) for f in range(len(ep))]
    picks = rng.choice(len(where), size=min(count, len(where)), replace=False)
    samples = []
    for k in sorted(int(p) for p in picks):
        e, f = where[k]
        h, c = states[e]
        frame = image.normalize(chosen[e].frames[f], config.preprocess)
        samples.append({'frame': frame[None], 'h': h[f : f + 1], 'c': c[f : f + 1]})
    described = {
        'samples': len(samples),
        'from': 'training episodes',
        'episodes': len(chosen),
        'frames': len(where),
    }
    return samples, described


def quantize(
    step_model: Any,
    path: Path,
    quantization: str,
    samples: Sequence[dict[str, np.ndarray]],
) -> None:
    """Write ``step_model`` quantized at ``path``: ``full_integer`` (calibrated on
    ``samples``; int8 kernels only, float32 I/O) or ``dynamic_range`` (weights only)."""
    if quantization not in QUANTIZATIONS:
        raise ConfigError(
            f'quantization must be one of {", ".join(QUANTIZATIONS)}, got {quantization!r}'
        )

    def representative() -> Iterator[dict[str, np.ndarray]]:
        yield from samples

    def configure(converter: Any) -> None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization == 'full_integer':
            converter.representative_dataset = representative
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]

    convert_step_model(step_model, path, configure)


def step_agreement(
    bundle: Bundle,
    candidate: Path,
    episodes: Sequence[Episode],
    num_threads: int = 1,
) -> Measured:
    """``candidate`` against the bundle's fp32 step model, stepped the robot's way over each
    episode (state carried from its start, reset between episodes)."""
    fp32 = Policy(LiteRTStep(bundle.tflite_path, num_threads=num_threads), bundle.config,
                  dt=bundle.dt)  # fmt: skip
    other = Policy(LiteRTStep(candidate, num_threads=num_threads), bundle.config, dt=bundle.dt)
    ours, theirs = [], []
    for ep in episodes:
        fp32.reset()
        other.reset()
        for frame in ep.frames:
            ours.append(fp32.step_fitted(frame).probabilities)
            theirs.append(other.step_fitted(frame).probabilities)
    actions = bundle.config.model.num_actions
    a = np.asarray(ours, np.float32).reshape(-1, actions)
    b = np.asarray(theirs, np.float32).reshape(-1, actions)
    labels = np.concatenate([ep.labels for ep in episodes]) if episodes else np.zeros(0, int)
    same = np.argmax(a, axis=1) == np.argmax(b, axis=1)
    by_label = {
        name: (int(np.sum(labels == i)), float(np.mean(same[labels == i])))
        for i, name in enumerate(bundle.config.actions.names)
        if np.any(labels == i)
    }
    return Measured(agreement(a, b), by_label)


def _training_split(
    bundle: Bundle,
    bags: Sequence[str | Path] | None,
    held_out: Sequence[str | Path],
    cache_dir: str | Path | None,
) -> tuple[list[Episode], list[Episode], str]:
    """(training episodes, held-out episodes, what the held-out ones are)."""
    sources = bundle.metadata['sources']
    known = {s.get('sha256') for s in sources if isinstance(s, dict)}
    if bags is None:
        bags = [s['path'] for s in sources if isinstance(s, dict) and 'path' in s]
        missing = [b for b in bags if not Path(b).exists()]
        if not bags or missing:
            raise DatasetError(
                f'{bundle.path}: the training recordings {missing or "(none listed)"} are not '
                'there; pass them with --bags (their sha256 must match the metadata)'
            )
    config = bundle.config
    rules = replace(dataset_config_of(bundle), seq_len=1, burn_in=0, stride=1)
    recordings = load_recordings(
        bags, config.preprocess, rules, config.actions, cache_dir=cache_dir
    )
    for report in recordings.reports:
        if report.sha256 not in known:
            raise DatasetError(
                f'{report.bag}: not one of the recordings {bundle.path} was trained on (its '
                'sha256 is not in metadata field sources): the held-out split would not be '
                "training's; give other recordings with --held-out"
            )
    # Training stores its TrainConfig with a few recipe constants beside it (clipnorm).
    stored = bundle.metadata['extra'].get('train', {})
    known = {f.name for f in fields(TrainConfig)}
    try:
        train_cfg = from_dict(TrainConfig, {k: v for k, v in stored.items() if k in known})
    except (ConfigError, AttributeError) as err:
        raise BundleError(f'{bundle.path}: metadata field extra.train: {err}') from err
    split = split_by_episode(recordings.episodes, train_cfg.val_fraction, train_cfg.seed)
    held = list(split.val)
    what = 'validation episodes' if held else ''
    if held_out:
        extra = load_recordings(
            held_out, config.preprocess, rules, config.actions, cache_dir=cache_dir
        )
        held += extra.episodes
        what = ' and '.join(w for w in (what, 'held-out bags') if w)
    if not held:  # val_fraction 0 and no --held-out: say so rather than pretend
        held, what = list(split.train), 'training episodes (no held-out episode)'
    return list(split.train), held, what


def export_int8(
    path: str | Path,
    *,
    bags: Sequence[str | Path] | None = None,
    held_out: Sequence[str | Path] = (),
    mode: str = 'auto',
    min_agreement: float = MIN_AGREEMENT,
    samples: int = SAMPLES,
    cache_dir: str | Path | None = None,
    num_threads: int = 1,
    log: Callable[[str], None] | None = None,
) -> Int8Export:
    """Add ``step_int8.tflite`` to the bundle at ``path`` (see the module doc); returns what was
    measured. ``bags``: where the training recordings are now (default: the metadata's paths).
    ``mode``: ``auto`` (full-integer, else dynamic-range), or one quantization forced."""
    if mode not in MODES:
        raise ConfigError(f'mode must be one of {", ".join(MODES)}, got {mode!r}')
    if not 0.0 <= min_agreement <= 1.0:
        raise ConfigError(f'min_agreement must be in [0, 1], got {min_agreement!r}')
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f'samples must be an integer >= 1, got {samples!r}')
    say = log or (lambda line: None)
    path = Path(path)
    bundle = load_bundle(path)
    train, held, what = _training_split(bundle, bags, held_out, cache_dir)
    say(f'{len(train)} training episodes, {len(held)} held-out episodes ({what})')
    sequence_model = load_sequence_model(bundle.keras_path, bundle.config.model)
    step_model = build_step_model(bundle.config.model, sequence_model)
    data, described = representative_samples(bundle, sequence_model, train, samples)
    say(f'representative data: {len(data)} frames with their LSTM states')
    modes = QUANTIZATIONS if mode == 'auto' else (mode,)
    tried: list[dict[str, Any]] = []
    best: tuple[Measured, str, Path] | None = None
    with tempfile.TemporaryDirectory(prefix='malpi_int8_') as scratch_dir:
        scratch = Path(scratch_dir)
        for quantization in modes:
            candidate = scratch / f'{quantization}.tflite'
            try:
                quantize(step_model, candidate, quantization, data)
                found = step_agreement(bundle, candidate, held, num_threads)
            except BundleError as err:  # e.g. an op with no int8 kernel: try the next way
                tried.append({'quantization': quantization, 'error': str(err)[:300]})
                say(f'{quantization}: failed: {err}')
                continue
            tried.append({'quantization': quantization, **found.fields()})
            say(
                f'{quantization}: same action {found.overall.action_agreement:.4f} (score '
                f'{found.score:.4f}: by label {found.by_label}), max probability difference '
                f'{found.overall.max_abs_diff:.4f} ({candidate.stat().st_size} bytes)'
            )
            if best is None or found.score > best[0].score:
                best = (found, quantization, candidate)
            if found.score >= min_agreement:
                break
        if best is None:
            raise BundleError(f'{path}: no int8 step model could be made: {tried}')
        found, quantization, candidate = best
        if found.score < min_agreement:
            say(
                f'WARNING: no quantization reached {min_agreement} same-action agreement; '
                f'keeping {quantization} (score {found.score:.4f})'
            )
        result = Int8Export(
            bundle=path,
            quantization=quantization,
            agreement=found,
            held_out=what,
            episodes=len(held),
            tried=tuple(tried),
            fp32_bytes=bundle.tflite_path.stat().st_size,
            int8_bytes=candidate.stat().st_size,
        )
        info = result.info(min_agreement, described)
        info['quantized_from'] = bundle.metadata['files'][KERAS_FILE]['sha256']
        add_model_file(path, candidate, INT8_FILE, **info)
    return result
