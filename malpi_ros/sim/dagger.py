"""make dagger: HG-DAgger rounds in the simulator, against behaviour cloning on as many frames.

Example:
    python -P -m malpi_ros.sim.dagger --out dagger_runs            # what `make dagger` runs
    python -P -m malpi_ros.sim.dagger --rounds 2 --laps 2 --eval-laps 5
    python -P -m malpi_ros.sim.dagger --train-config config/sim_train.yaml \
        --base-segments 800 --epochs 25 --round-epochs 8    # the cue too (README)

Round 0 records a few clean expert laps (``base_episodes`` episodes of one lap: no recovery
demonstrations) and, with ``base_segments``, short expert drives through cue and fork, each as
long as training keeps in one gradient (``DatasetConfig.drive_frames``: a window, or a chunk
when the state is carried; the demonstrations the cue needs, as in the demo's recording; they
show no recovery either), and trains a policy on them. Each round after that lets the
previous round's policy drive ``laps`` laps with the simulated person watching
(``sim.supervisor``: it takes over through ``teleop/cmd_vel`` when the robot strays and lets go
once it is back), records the drive
as a robot would (``sim.record.record_supervised``: camera, ``cmd_vel``, ``teleop/cmd_vel``,
``~/applied``), and retrains on every recording so far, labelled from what was applied (the
person's commands during takeovers, the policy's own elsewhere; ``intervention_weight`` of the
training config). With ``warm_start`` a round starts from the previous round's weights and
trains ``round_epochs``; without it, from scratch for ``epochs``. Every policy is then
evaluated driving ``eval_laps`` laps alone (``demo.drive_offline``, the state carried, the same
sim seed every round). The baseline, in the same run: behaviour cloning from scratch on the
round-0 laps plus clean expert frames recorded to make up exactly the corrections' count
(``RecordConfig.max_frames``), so it sees as many expert frames as the last round.

Expert frames: frames labelled by the expert (the clean laps, and the takeover frames whose
applied source is teleop), counted in the recordings as training reads them. The table: per
round, takeovers per supervised lap, expert frames so far (and all frames trained on), off-track
events per lap driven without the supervisor, and cued-fork success.

Everything goes under ``OUT/<timestamp>/``: the bags, bundles, ``dagger.log``, ``table.txt``,
``results.json``. No ROS: nothing here starts rclpy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from malpi_ros.checks import int_at_least
from malpi_ros.config_file import build_configs, read_config_file
from malpi_ros.errors import ConfigError, MalpiError
from malpi_ros.progress import epoch_lines
from malpi_ros.sim.record import (
    IMAGE_FORMATS,
    RecordConfig,
    record_expert,
    record_supervised,
    recording_workers,
)
from malpi_ros.sim.track import get_track
from malpi_ros.sim.world import SimConfig

Log = Callable[[str], None]


@dataclass(frozen=True)
class DaggerConfig:
    """How many rounds, laps and epochs; what round 0 starts from (see the module doc)."""

    rounds: int = 3
    laps: int = 3
    eval_laps: int = 10
    base_episodes: int = 1
    # Short expert drives through cue and fork in round 0's recording (``RecordConfig.segments``,
    # each ``DatasetConfig.drive_frames`` long): the demonstrations the cue needs. 0: laps only.
    # Measured: the cheap recipe did not learn the cue from 800 of them either (README).
    base_segments: int = 0
    epochs: int = 15
    round_epochs: int = 8
    warm_start: bool = True
    seed: int = 0
    image_format: str = 'jpeg'

    def __post_init__(self) -> None:
        int_at_least('dagger rounds', self.rounds, 1)
        for name in ('laps', 'eval_laps', 'base_episodes', 'epochs', 'round_epochs'):
            int_at_least(f'dagger {name}', getattr(self, name), 1)
        int_at_least('dagger base_segments', self.base_segments, 0)
        int_at_least('dagger seed', self.seed, 0)
        if not isinstance(self.warm_start, bool):
            raise ConfigError(f'dagger warm_start must be true or false, got {self.warm_start!r}')
        if self.image_format not in IMAGE_FORMATS:
            raise ConfigError(
                f'dagger image_format must be one of {", ".join(IMAGE_FORMATS)}, '
                f'got {self.image_format!r}'
            )

    @property
    def eval_seed(self) -> int:
        """The sim seed of every evaluation drive: the same laps for every policy."""
        return 10_000 + self.seed


@dataclass(frozen=True)
class Row:
    """One line of the table: a policy, the data it was trained on, and how it drove alone."""

    name: str
    supervised_laps: int  # laps driven with the supervisor to record this round (0: none)
    takeovers: int
    takeover_frames: int
    expert_frames: int  # frames labelled by the expert in the training data, so far
    trained_frames: int  # every frame trained on (the policy's own included)
    eval_laps: int  # laps completed without the supervisor
    laps_driven: float  # distance without the supervisor, in laps
    off_track_events: int
    off_track_at_fork: int  # of them, those that began in the fork
    forks_correct: int
    forks: int
    train_seconds: float

    @property
    def takeovers_per_lap(self) -> float | None:
        return self.takeovers / self.supervised_laps if self.supervised_laps else None

    @property
    def off_track_per_lap(self) -> float:
        return self.off_track_events / max(self.laps_driven, 1e-9)


def count_frames(
    bags: Sequence[Path], policy: Any, dataset: Any, cache: Path | None = None
) -> tuple[int, int]:
    """(frames, takeover frames) in ``bags`` as training reads them (in episodes)."""
    if not bags:
        return 0, 0
    from malpi_ros.learn.dataset import load_recordings

    recordings = load_recordings(bags, policy.preprocess, dataset, policy.actions, cache_dir=cache)
    return recordings.frames, sum(r.takeover_frames for r in recordings.reports)


def run_dagger(
    run_dir: Path,
    cfg: DaggerConfig,
    train_config: Path,
    sim: SimConfig | None = None,
    log: Log = print,
) -> list[Row]:
    """Round 0, ``cfg.rounds`` DAgger rounds and the baseline; returns the table's rows."""
    from malpi_ros.learn.train import train  # TensorFlow: only here
    from malpi_ros.sim.demo import drive_offline

    sim = sim or SimConfig()
    lap_length = get_track(sim.track).length
    sections = read_config_file(train_config)
    policy, dataset, _ = build_configs(sections, {}, str(train_config))
    record = RecordConfig(
        episodes=cfg.base_episodes, laps=1, seed=cfg.seed, image_format=cfg.image_format
    )
    cache = run_dir / 'cache'

    def fit(name: str, bags: list[Path], epochs: int, warm: Path | None) -> tuple[Path, float]:
        # No validation split whatever the config says: the drive alone is the judge, and a
        # held-out episode could be a round's only recording of its corrections.
        overrides = {'epochs': epochs, 'val_fraction': 0.0}
        _, _, train_cfg = build_configs(sections, overrides, str(train_config))
        bundle = run_dir / f'{name}_bundle'
        started = time.monotonic()
        train(
            bags, bundle, policy, dataset, train_cfg, cache_dir=cache, verbose=0,
            log=epoch_lines(log, name), warm_start=warm,
        )  # fmt: skip
        seconds = time.monotonic() - started
        how = f'warm start, {epochs} epochs' if warm else f'{epochs} epochs'
        log(f'{name}: trained on {len(bags)} bag(s) ({how}) in {seconds:.0f} s')
        return bundle, seconds

    def row(
        name: str,
        bundle: Path,
        clean: list[Path],
        supervised: list[Path],
        seconds: float,
        drove: dict[str, Any] | None = None,
    ) -> Row:
        clean_frames, _ = count_frames(clean, policy, dataset, cache)
        supervised_frames, taken = count_frames(supervised, policy, dataset, cache)
        alone = drive_offline(bundle, cfg.eval_laps, cfg.eval_seed, False, sim)
        got = Row(
            name=name,
            supervised_laps=int(drove['laps']) if drove else 0,
            takeovers=int(drove['takeovers']) if drove else 0,
            takeover_frames=int(drove['takeover_frames']) if drove else 0,
            expert_frames=clean_frames + taken,
            trained_frames=clean_frames + supervised_frames,
            eval_laps=int(alone['laps']),
            laps_driven=float(alone['distance']) / lap_length,
            off_track_events=int(alone['off_track_events']),
            off_track_at_fork=int(alone['off_track_at_fork']),
            forks_correct=int(alone['forks_correct']),
            forks=int(alone['forks']),
            train_seconds=seconds,
        )
        log(format_row(got))
        return got

    base_bag = run_dir / 'round0_bag'
    base_record = replace(record, segments=cfg.base_segments, segment_frames=dataset.drive_frames)
    base = record_expert(base_bag, base_record, sim, workers=recording_workers())
    n = cfg.base_segments
    drives = f' and {n} short drives through cue and fork' if n else ''
    log(f'round 0: {base.frames} frames of clean expert driving ({base.laps} laps{drives})')
    bundle, seconds = fit('round0', [base_bag], cfg.epochs, None)
    rows = [row('round 0', bundle, [base_bag], [], seconds)]
    supervised: list[Path] = []
    for k in range(1, cfg.rounds + 1):
        bag = run_dir / f'round{k}_bag'
        drove = record_supervised(
            bag, bundle, cfg.laps, seed=cfg.seed * 100 + k, config=record, sim=sim
        )
        summary = drove.summaries[0]
        log(
            f'round {k}: {drove.frames} frames supervised, {summary["takeovers"]} takeovers, '
            f'{summary["takeover_frames"]} takeover frames'
        )
        supervised.append(bag)
        warm = bundle if cfg.warm_start else None
        bundle, seconds = fit(
            f'round{k}', [base_bag, *supervised], cfg.round_epochs if warm else cfg.epochs, warm
        )
        rows.append(row(f'round {k}', bundle, [base_bag], supervised, seconds, summary))
    corrections = rows[-1].expert_frames - rows[0].expert_frames
    clean = [base_bag]
    if corrections > 0:
        extra = run_dir / 'baseline_bag'
        # One episode of as many laps as it takes, cut at exactly that many frames (several
        # episodes could leave a last one too short for training to use).
        more = replace(
            record, seed=cfg.seed + 1, episodes=1, laps=corrections // 200 + 1,
            max_frames=corrections,
        )  # fmt: skip
        made = record_expert(extra, more, sim)
        log(f'baseline: {made.frames} more clean expert frames (the corrections: {corrections})')
        clean.append(extra)
    bundle, seconds = fit('baseline', clean, cfg.epochs, None)
    rows.append(row('baseline (BC)', bundle, clean, [], seconds))
    return rows


def format_row(r: Row) -> str:
    per_lap = f'{r.takeovers_per_lap:.2f}' if r.takeovers_per_lap is not None else '-'
    forks = f'{r.forks_correct}/{r.forks}' + (
        f' ({r.forks_correct / r.forks:.0%})' if r.forks else ''
    )
    return (
        f'| {r.name} | {per_lap} | {r.expert_frames} | {r.trained_frames} '
        f'| {r.off_track_per_lap:.2f} ({r.off_track_events} in {r.laps_driven:.1f}) '
        f'| {r.off_track_at_fork} '
        f'| {forks} | {r.train_seconds:.0f} |'
    )


def format_table(rows: Sequence[Row]) -> str:
    """A markdown table, one row a round and one for the baseline."""
    lines = [
        '| policy | takeovers per supervised lap | expert frames so far | frames trained on '
        '| off-track per lap alone (events in laps) | of them at the fork | cued forks alone '
        '| training s |',
        '|---|---:|---:|---:|---:|---:|---:|---:|',
    ]
    return '\n'.join([*lines, *(format_row(r) for r in rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m malpi_ros.sim.dagger',
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = DaggerConfig()
    parser.add_argument('--out', type=Path, default=Path('dagger_runs'), help='runs go here')
    parser.add_argument('--rounds', type=int, default=d.rounds, help='rounds after round 0')
    parser.add_argument('--laps', type=int, default=d.laps, help='supervised laps a round')
    parser.add_argument('--eval-laps', type=int, default=d.eval_laps, help='laps alone')
    parser.add_argument(
        '--base-episodes', type=int, default=d.base_episodes, help="round 0's clean laps"
    )
    parser.add_argument(
        '--base-segments',
        type=int,
        default=d.base_segments,
        help="round 0's short expert drives through cue and fork (the demo's: 800)",
    )
    parser.add_argument('--epochs', type=int, default=d.epochs, help='from scratch')
    parser.add_argument('--round-epochs', type=int, default=d.round_epochs, help='warm start')
    parser.add_argument(
        '--cold', action='store_true', help='every round from scratch (no warm start)'
    )
    parser.add_argument('--seed', type=int, default=d.seed)
    parser.add_argument('--train-config', type=Path, help='default: config/sim_dagger.yaml')
    args = parser.parse_args(argv)
    from malpi_ros.sim.demo import default_file, new_run_dir

    try:
        cfg = DaggerConfig(
            rounds=args.rounds,
            laps=args.laps,
            eval_laps=args.eval_laps,
            base_episodes=args.base_episodes,
            base_segments=args.base_segments,
            epochs=args.epochs,
            round_epochs=args.round_epochs,
            warm_start=not args.cold,
            seed=args.seed,
        )
        train_config = (args.train_config or default_file('config', 'sim_dagger.yaml')).resolve()
    except MalpiError as err:
        print(f'dagger: error: {err}', file=sys.stderr)
        return 2
    run_dir = new_run_dir(args.out).resolve()
    began = time.monotonic()

    def log(line: str) -> None:
        print(line, flush=True)
        with (run_dir / 'dagger.log').open('a') as f:
            f.write(line + '\n')

    log(f'dagger: {cfg}, training config {train_config}')
    try:
        rows = run_dagger(run_dir, cfg, train_config, log=log)
    except MalpiError as err:
        print(f'dagger: error: {err}', file=sys.stderr)
        return 1
    table = format_table(rows)
    minutes = round((time.monotonic() - began) / 60, 1)
    (run_dir / 'table.txt').write_text(table + '\n')
    results = {'config': asdict(cfg), 'rows': [asdict(r) for r in rows], 'minutes': minutes}
    (run_dir / 'results.json').write_text(json.dumps(results, indent=2) + '\n')
    log(table)
    log(f'{minutes} min; everything is in {run_dir}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
