"""make compare: the LSTM with its state carried against the peers' window policies, on the same
recordings and in the same simulator, at the short and the long memory horizon.

Example:
    python -P -m malpi_ros.sim.compare --out compare_runs          # what `make compare` runs
    python -P -m malpi_ros.sim.compare --horizons short --window-epochs 6

For each horizon (``TrackConfig.for_horizon``: the cue 14-15 or 58-60 frames of driving before
the fork): record the expert in-process (``sim.record``; the demo's mix of full laps and short
drives that end just past the fork, each one LSTM training window long), then train with
``config/sim_train.yaml`` on that one bag (one frame cache for all) each policy kind — (a) the
LSTM, stepped with its state carried, (b) window policies that re-run their last K frames from
a zero state every step (DonkeyCar's way; K = 3 and 10 by default) — and drive each ``laps``
laps in-process (``demo.drive_offline``: frame, step, act, no ROS), plus the LSTM with its state
reset before every frame (no memory). The table: cued branch taken / forks, off-track events,
the policy's compute per frame (FLOPs counted from the model config, ``model_cost``; median
``Policy.step`` and its model part, measured in the same run), and what it holds between frames
(the LSTM's state, or K fitted frames) with the peak RSS of a process that loads it and steps.

The LSTM trains with the recipe the simulator's figures support (README, "The memory recipe"):
windows from a zero state whose burn-in reaches well before the cue (``LSTM_BURN_IN``: 110
frames at the short horizon as the demo, 150 at the long one), 10 scored frames at the fork;
the robot's way of stepping it, the state carried over all laps, is what the table measures.
Horizons run shortest first, and each horizon's LSTM starts from the weights of the one before
(a curriculum; ``--no-curriculum``: from scratch): from scratch the long horizon's cue was not
learned in 25 epochs, from the short horizon's weights it was (README).

Everything goes under ``OUT/<timestamp>/``: the bags, bundles, ``results.json``, ``table.txt``.
No ROS: nothing here starts rclpy.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from malpi_ros.config_file import build_configs, read_config_file
from malpi_ros.errors import MalpiError
from malpi_ros.model_cost import count_flops
from malpi_ros.progress import epoch_lines
from malpi_ros.sim.record import RecordConfig, record_expert, recording_workers
from malpi_ros.sim.track import HORIZONS, TrackConfig
from malpi_ros.sim.world import SimConfig

# The LSTM's unscored steps before the 10 scored frames at the fork, per horizon: about 65 and
# 90 frames of driving before the cue (14-15 and 58-60 frames before the fork), so the cue is
# learned from a state with history, as on the road (shorter windows lost it there).
LSTM_BURN_IN = {'short': 110, 'long': 150}
# The frames the LSTM's gradient runs through, counted back from a window's end
# (``DatasetConfig.bptt``): back past the cue, with room (the frames before run forward only).
LSTM_BPTT = {'short': 40, 'long': 90}

# Epochs of the window policies: every frame starts a training window of K frames, so an
# epoch is K frame steps a frame; 3 drove both horizons' tracks without an off-track event
# (README "make compare").
WINDOW_EPOCHS = 3


# The demo's expert data: full laps, and short drives of one LSTM window each.
COMPARE_RECORDING = RecordConfig(episodes=6, laps=2, segments=800, image_format='jpeg')


def lstm_warm_start(horizon: str, trained: dict[str, Path], curriculum: bool) -> Path | None:
    """The bundle a horizon's LSTM starts from: with ``curriculum``, the LSTM this run trained
    at the longest shorter horizon (``HORIZONS``, by cue distance), else none (from scratch).
    From scratch the long horizon's cue was not learned in 25 epochs (one run); started from
    the short horizon's weights it was from the first epoch (README "make compare")."""
    if not curriculum:
        return None
    shorter = [h for h in trained if HORIZONS[h] < HORIZONS[horizon]]
    return trained[max(shorter, key=HORIZONS.__getitem__)] if shorter else None


def recording_for(horizon: str, record: RecordConfig, scored: int) -> RecordConfig:
    """``record`` with its short drives one LSTM training window long at ``horizon``."""
    return replace(record, segment_frames=LSTM_BURN_IN[horizon] + scored)


_CHILD = """
import json, sys
import numpy as np
from malpi_ros.runtime.policy import Policy
policy = Policy.from_bundle(sys.argv[1], backend='litert', num_threads=1)
frame = np.zeros((120, 160, 3), np.uint8)
for _ in range(int(sys.argv[2]) + 1):
    policy.step(frame)
with open('/proc/self/status') as f:
    print(json.dumps({'hwm_kb': int(f.read().split('VmHWM:')[1].split()[0])}))
"""


@dataclass(frozen=True)
class Entry:
    """One row of the table: a policy kind driven at one horizon."""

    horizon: str
    name: str
    window: int  # 0: the LSTM with its state carried
    reset_every_frame: bool
    forks_correct: int
    forks: int
    off_track_events: int
    laps: int
    step_ms_median: float  # the whole Policy.step: the camera frame's fit, normalize, model
    model_ms_median: float  # the step less the fit: K normalizations and model calls (LSTM: 1)
    mflops: float  # the model's FLOPs a frame (millions): K steps of the step model (LSTM: 1)
    held_bytes: int  # what the policy keeps between frames
    peak_rss_mb: float
    train_seconds: float

    @property
    def fork_accuracy(self) -> float | None:
        return self.forks_correct / self.forks if self.forks else None


def held_bytes(window: int, units: int, frame_shape: Sequence[int]) -> int:
    """Bytes a policy keeps between frames: (h, c) float32, or K fitted uint8 frames."""
    if window:
        return window * math.prod(frame_shape)
    return 4 * 2 * units


def peak_rss_mb(bundle: Path, steps: int) -> float:
    """Peak RSS (VmHWM) of a fresh LiteRT-only process that loads ``bundle`` and steps."""
    out = subprocess.run(
        [sys.executable, '-c', _CHILD, str(bundle), str(steps)],
        cwd=tempfile.gettempdir(),  # the installed package, never a source tree
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])['hwm_kb'] / 1024.0


def run_compare(
    run_dir: Path,
    *,
    horizons: Sequence[str],
    windows: Sequence[int],
    record: RecordConfig,
    train_config: Path,
    epochs: int | None,
    laps: int,
    seed: int,
    window_epochs: int | None = None,
    curriculum: bool = True,
    log: Callable[[str], None] = print,
) -> list[Entry]:
    """Record, train and drive every kind at every horizon; returns the table's rows. Horizons
    run shortest first; with ``curriculum`` each LSTM starts from the last one's weights."""
    from malpi_ros.learn.train import train  # TensorFlow: only here
    from malpi_ros.sim.demo import drive_offline

    entries = []
    lstms: dict[str, Path] = {}
    for horizon in sorted(horizons, key=HORIZONS.__getitem__):
        sim = SimConfig(track=TrackConfig.for_horizon(horizon))
        bag = run_dir / f'{horizon}_bag'
        started = time.monotonic()
        _, lstm_dataset, _ = build_configs(read_config_file(train_config), {}, str(train_config))
        recording = recording_for(horizon, record, lstm_dataset.seq_len)
        recorded = record_expert(bag, recording, sim, workers=recording_workers())
        log(
            f'{horizon}: recorded {recorded.frames} expert frames in '
            f'{time.monotonic() - started:.0f} s'
        )
        for window in (0, *windows):
            overrides = {
                'window': window or None,
                'epochs': (window_epochs or epochs) if window else epochs,
                'burn_in': None if window else LSTM_BURN_IN[horizon],
                'bptt': None if window else LSTM_BPTT[horizon],
            }
            policy, dataset, train_cfg = build_configs(
                read_config_file(train_config), overrides, str(train_config)
            )
            name = f'window {window}' if window else 'LSTM, state carried'
            bundle = run_dir / f'{horizon}_{"window" + str(window) if window else "lstm"}'
            warm = None if window else lstm_warm_start(horizon, lstms, curriculum)
            started = time.monotonic()
            train(
                [bag],
                bundle,
                policy,
                dataset,
                train_cfg,
                cache_dir=run_dir / f'{horizon}.cache',
                verbose=0,
                log=epoch_lines(log, f'{horizon}, {name}'),
                warm_start=warm,
            )
            seconds = time.monotonic() - started
            if not window:
                lstms[horizon] = bundle
            start = f' (from the {warm.name} weights)' if warm else ''
            log(f'{horizon}: trained {name}{start} in {seconds:.0f} s')
            rss = peak_rss_mb(bundle, max(window, 1))
            held = held_bytes(window, policy.model.lstm_units, policy.model.input_shape)
            mflops = max(window, 1) * sum(count_flops(policy.model).values()) / 1e6
            for reset in (False, True) if not window else (False,):
                drove = drive_offline(bundle, laps, seed, reset, sim)
                entry = Entry(
                    horizon=horizon,
                    name=name if not reset else 'LSTM, state reset every frame',
                    window=window,
                    reset_every_frame=reset,
                    forks_correct=int(drove['forks_correct']),
                    forks=int(drove['forks']),
                    off_track_events=int(drove['off_track_events']),
                    laps=int(drove['laps']),
                    step_ms_median=float(drove['step_ms_median']),
                    model_ms_median=float(drove['model_ms_median']),
                    mflops=mflops,
                    held_bytes=0 if reset else held,
                    peak_rss_mb=rss,
                    train_seconds=seconds,
                )
                log(f'{horizon}: {format_row(entry)}')
                entries.append(entry)
    return entries


def format_row(e: Entry) -> str:
    acc = f'{e.fork_accuracy:.0%}' if e.fork_accuracy is not None else 'n/a'
    return (
        f'| {e.horizon} | {e.name} | {e.forks_correct}/{e.forks} ({acc}) | {e.off_track_events} '
        f'| {e.mflops:.2f} | {e.model_ms_median:.3f} | {e.step_ms_median:.3f} '
        f'| {e.held_bytes / 1024:.1f} KiB | {e.peak_rss_mb:.0f} MB |'
    )


def format_table(entries: Sequence[Entry]) -> str:
    """A markdown table; compute is also given relative to the LSTM at the same horizon: in
    FLOPs, in the model part's time and in the whole step's (which adds the frame's fit, the
    same for every kind, so its ratio stays below K however the model is run)."""
    lines = [
        '| horizon | policy | cued branch / forks | off-track | MFLOP a frame | model ms '
        '(median) | step ms (median) | held between frames | peak RSS |',
        '|---|---|---|---|---:|---:|---:|---:|---:|',
    ]
    lines += [format_row(e) for e in entries]
    for horizon in dict.fromkeys(e.horizon for e in entries):
        lstm = next((e for e in entries if e.horizon == horizon and not e.window), None)
        if lstm is None or lstm.step_ms_median <= 0 or lstm.model_ms_median <= 0:
            continue
        for e in entries:
            if e.horizon == horizon and e.window:
                lines.append(
                    f'{horizon}: window {e.window} computes {e.mflops / lstm.mflops:.1f}x the '
                    f"LSTM's FLOPs a frame, {e.model_ms_median / lstm.model_ms_median:.1f}x its "
                    f'model time, {e.step_ms_median / lstm.step_ms_median:.1f}x its whole step'
                )
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m malpi_ros.sim.compare',
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument('--out', type=Path, default=Path('compare_runs'), help='runs go here')
    parser.add_argument('--horizons', nargs='+', choices=list(HORIZONS), default=list(HORIZONS))
    parser.add_argument('--windows', nargs='*', type=int, default=[3, 10], help='window Ks')
    parser.add_argument('--laps', type=int, default=20, help='laps each kind drives')
    parser.add_argument('--epochs', type=int, help='override the training config')
    parser.add_argument(
        '--window-epochs',
        type=int,
        default=WINDOW_EPOCHS,
        help=f"window policies' epochs (default {WINDOW_EPOCHS}: each is K frame steps a frame)",
    )
    parser.add_argument('--episodes', type=int, help='full-lap expert episodes to record')
    parser.add_argument('--segments', type=int, help='short cue-to-fork expert drives')
    parser.add_argument('--train-config', type=Path, help='default: config/sim_train.yaml')
    parser.add_argument('--seed', type=int, default=11, help='sim seed of the drives')
    parser.add_argument(
        '--no-curriculum',
        action='store_true',
        help="train each horizon's LSTM from scratch (default: from the shorter horizon's)",
    )
    args = parser.parse_args(argv)
    from malpi_ros.sim.demo import default_file, new_run_dir

    run_dir = new_run_dir(args.out).resolve()
    train_config = (args.train_config or default_file('config', 'sim_train.yaml')).resolve()
    changes = {k: getattr(args, k) for k in ('episodes', 'segments') if getattr(args, k)}
    record = replace(COMPARE_RECORDING, **changes)
    began = time.monotonic()

    def log(line: str) -> None:
        print(line, flush=True)
        with (run_dir / 'compare.log').open('a') as f:
            f.write(line + '\n')

    try:
        entries = run_compare(
            run_dir,
            horizons=args.horizons,
            windows=args.windows,
            record=record,
            train_config=train_config,
            epochs=args.epochs,
            laps=args.laps,
            seed=args.seed,
            window_epochs=args.window_epochs,
            curriculum=not args.no_curriculum,
            log=log,
        )
    except MalpiError as err:
        print(f'compare: error: {err}', file=sys.stderr)
        return 1
    table = format_table(entries)
    (run_dir / 'table.txt').write_text(table + '\n')
    results: dict[str, Any] = {
        'rows': [e.__dict__ for e in entries],
        'minutes': round((time.monotonic() - began) / 60, 1),
    }
    (run_dir / 'results.json').write_text(json.dumps(results, indent=2) + '\n')
    log(table)
    log(f'{results["minutes"]} min; everything is in {run_dir}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
