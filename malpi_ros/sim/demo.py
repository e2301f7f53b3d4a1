"""make demo: record the simulator's expert, train on it, let the policy drive, then the ablation.

Example:
    python -P -m malpi_ros.sim.demo --out demo_runs         # what `make demo` runs
    python -P -m malpi_ros.sim.demo --laps 5 --bundle demo_runs/<run>/bundle   # drive only

Steps, everything under ``OUT/<timestamp>/`` (a second run never touches the first):
1. record expert driving in-process, faster than real time (``malpi_ros.sim.record``), into
   ``expert_bag/`` (mcap), and print ``malpi-ros inspect`` of it;
2. ``malpi-ros train expert_bag --out bundle --config config/sim_train.yaml``;
3. start ``sim_node``, ``policy_node`` (litert) and ``motor_driver_node`` (sim backend) as
   separate processes with ``config/nodes/sim.yaml`` and the remaps of ``launch/sim.launch.py``,
   plus ``malpi-ros record`` of the evaluation topics; drive until ``laps`` laps or ``time_limit``;
4. the same with ``policy_node`` ``reset_every_frame:=true`` (no memory: the ablation);
   after each drive, the same policy mode also drives ``--offline-laps`` laps in-process
   (``drive_offline``: no ROS, no waiting), because two forks make no rate;
5. print the table (laps, off-track events, cued branch taken / forks, mean speed, policy
   latency p50/p99) and write ``trajectories.png``, ``results.json`` and ``table.txt``.

This module never imports rclpy (DESIGN §7): the nodes run as processes, progress comes from
``sim_node``'s ``progress_file``, and latencies and trajectories from the recorded bag (read with
``malpi_ros.bagio.reader``). Every process gets ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` and the
``ROS_DOMAIN_ID`` of the environment (``--domain-id`` overrides it; 42 when neither is set).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from malpi_ros.bagio import reader as bagio
from malpi_ros.errors import ConfigError, MalpiError
from malpi_ros.processes import SHARE_DIR, installed, ros_env, stop_process
from malpi_ros.progress import format_duration
from malpi_ros.runtime.node_stats import percentile
from malpi_ros.sim.plot import plot_trajectories
from malpi_ros.sim.record import RecordConfig, RecordResult, record_expert, recording_workers
from malpi_ros.sim.track import get_track
from malpi_ros.sim.world import SimConfig, SimWorld

REPO = Path(__file__).resolve().parents[2]  # the source tree, when nothing is installed

# The graph of launch/sim.launch.py (test_demo checks the two agree).
REMAPS = {
    'sim_node': [('wheels', '/motor_driver_node/wheels')],
    'policy_node': [('image', '/camera/image_raw'), ('applied', '/motor_driver_node/applied')],
    'motor_driver_node': [],
}
# ~/output and ~/applied: `malpi-ros latency RUN/carried/drive_bag` reports the drive's stages.
RECORDED_TOPICS = (
    '/sim_node/pose',
    '/sim_node/progress',
    '/policy_node/output',
    '/cmd_vel',
    '/motor_driver_node/applied',
)
RUNS = (('carried', False), ('ablation', True))  # (name, reset_every_frame)
LABELS = {'carried': 'state carried', 'ablation': 'reset every frame'}
STOP_TIMEOUT = 10.0  # s for a process to exit after SIGINT before it is killed
# The expert data of the demo (part of the recipe, with config/sim_train.yaml; README says why):
# full laps, to drive the whole loop, plus many short drives that end just past the fork's start,
# each exactly one training window long, so the one action per lap that needs memory (taking
# the cued branch) is in the scored part of a window. Windows of 120 frames: ~65 frames of
# driving before the cue, so the LSTM learns to hold the cue from a state that has a history
# (as on the road), not only from the zero state a window starts with. JPEG: 5 KB a frame, not
# 58 KB (the recording would be ~5 GB raw).
DEMO_RECORDING = RecordConfig(
    episodes=6, laps=2, segments=800, segment_frames=120, image_format='jpeg'
)


@dataclass(frozen=True)
class DriveConfig:
    """One closed-loop drive: how long, and what the policy node is told."""

    laps: int = 3
    time_limit: float = 240.0  # wall s after the start of the sim clock
    startup_timeout: float = 60.0  # wall s for the graph to produce its first moving command
    reset_every_frame: bool = False
    time_scale: float = 1.0
    seed: int = 0
    backend: str = 'litert'

    def __post_init__(self) -> None:
        if isinstance(self.laps, bool) or not isinstance(self.laps, int) or self.laps < 1:
            raise ConfigError(f'laps must be an integer >= 1, got {self.laps!r}')
        for name in ('time_limit', 'startup_timeout', 'time_scale'):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0):
                raise ConfigError(f'{name} must be > 0, got {value!r}')
        if self.backend not in ('litert', 'keras'):
            raise ConfigError(f'backend must be litert or keras, got {self.backend!r}')


@dataclass
class DriveResult:
    """What one drive gave: sim_node's last progress report, the recorded trajectory and
    the policy's latencies."""

    name: str
    progress: dict[str, Any]
    trajectory: np.ndarray  # (N, 2) x, y from ~/pose
    inference_ms: np.ndarray  # policy_node's own decode + preprocess + step time per frame
    frame_to_output_ms: np.ndarray  # frame stamp -> ~/output received by the recorder
    wall_seconds: float
    stopped_by: str  # 'laps' | 'time limit' | 'process exit'
    bag: Path | None = None
    steps_since_reset_max: int = 0
    notes: list[str] = field(default_factory=list)
    offline: dict[str, Any] | None = None  # drive_offline's summary for the same policy mode

    def row(self) -> dict[str, Any]:
        """The table's numbers (plain values, for results.json too)."""
        p = self.progress
        forks, right = int(p.get('forks', 0)), int(p.get('forks_correct', 0))
        return {
            'laps': int(p.get('laps', 0)),
            'off_track_events': int(p.get('off_track_events', 0)),
            'forks_correct': right,
            'forks': forks,
            'fork_accuracy': right / forks if forks else None,
            'mean_speed': float(p.get('mean_speed', 0.0)),
            'sim_time': float(p.get('time', 0.0)),
            'latency_p50_ms': percentile(self.inference_ms, 50),
            'latency_p99_ms': percentile(self.inference_ms, 99),
            'frame_to_output_p50_ms': percentile(self.frame_to_output_ms, 50),
            'frame_to_output_p99_ms': percentile(self.frame_to_output_ms, 99),
            'policy_steps': int(self.inference_ms.size),
            'max_steps_since_reset': self.steps_since_reset_max,
            'stopped_by': self.stopped_by,
            'wall_seconds': round(self.wall_seconds, 1),
            'offline': self.offline,
        }


# --- pure helpers -------------------------------------------------------------------------------


def new_run_dir(root: str | Path, now: datetime | None = None) -> Path:
    """``root/<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``... when taken), created empty."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = (now or datetime.now()).strftime('%Y%m%d-%H%M%S')
    for n in range(1, 1000):
        path = root / (stamp if n == 1 else f'{stamp}-{n}')
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise MalpiError(f'cannot make a new run directory under {root}')


def default_file(kind: str, name: str) -> Path:
    """``share/malpi_ros/<kind>/<name>`` as installed, else the source tree's."""
    for base in (SHARE_DIR, REPO):
        path = base / kind / name
        if path.exists():
            return path
    raise MalpiError(f'{kind}/{name} not found under {SHARE_DIR} or {REPO}')


def ros_args(node: str, params: Path, extra: dict[str, Any] | None = None) -> list[str]:
    """``--ros-args`` of one node: the params file, its remaps, then ``-p`` overrides."""
    args = ['--ros-args', '--params-file', str(params)]
    for src, dst in REMAPS[node]:
        args += ['-r', f'{src}:={dst}']
    for key, value in (extra or {}).items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        args += ['-p', f'{key}:={text}']
    return args


def drive_commands(
    bundle: Path, params: Path, progress_file: Path, bag: Path, cfg: DriveConfig
) -> dict[str, list[str]]:
    """The processes of one drive, in start order (the recorder first, the sim last)."""
    return {
        'record': [
            *installed('malpi-ros'),
            'record',
            '--out',
            str(bag),
            '--topics',
            *RECORDED_TOPICS,
        ],
        'motor_driver_node': [
            *installed('motor_driver_node'),
            *ros_args('motor_driver_node', params),
        ],
        'policy_node': [
            *installed('policy_node'),
            *ros_args(
                'policy_node',
                params,
                {
                    'bundle': bundle,
                    'backend': cfg.backend,
                    'reset_every_frame': cfg.reset_every_frame,
                },
            ),
        ],
        'sim_node': [
            *installed('sim_node'),
            *ros_args(
                'sim_node',
                params,
                {
                    'progress_file': progress_file,
                    'seed': cfg.seed,
                    'time_scale': cfg.time_scale,
                },
            ),
        ],
    }


def read_progress(path: Path) -> dict[str, Any] | None:
    """sim_node's last report, or None while there is none (it is replaced atomically)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def format_table(results: Sequence[DriveResult]) -> str:
    """The demo's table: one column per drive."""
    rows = [r.row() for r in results]

    def ms(a: float | None, b: float | None) -> str:
        return 'n/a' if a is None or b is None else f'{a:.2f} / {b:.2f}'

    def forks(row: dict[str, Any]) -> str:
        if not row['forks']:
            return '0/0'
        return f'{row["forks_correct"]}/{row["forks"]} ({100 * row["fork_accuracy"]:.0f}%)'

    lines = [
        ('', [LABELS.get(r.name, r.name) for r in results]),
        ('laps completed', [str(r['laps']) for r in rows]),
        ('off-track events', [str(r['off_track_events']) for r in rows]),
        ('cued branch taken / forks', [forks(r) for r in rows]),
        ('mean speed (m/s)', [f'{r["mean_speed"]:.3f}' for r in rows]),
        (
            'policy latency p50 / p99 (ms)',
            [ms(r['latency_p50_ms'], r['latency_p99_ms']) for r in rows],
        ),
        (
            'frame -> output p50 / p99 (ms)',
            [ms(r['frame_to_output_p50_ms'], r['frame_to_output_p99_ms']) for r in rows],
        ),
        ('policy steps', [str(r['policy_steps']) for r in rows]),
        ('stopped by', [r['stopped_by'] for r in rows]),
    ]
    offline = [r['offline'] for r in rows]
    if any(offline):
        laps = max(o['laps'] for o in offline if o)

        def off(o: dict[str, Any] | None) -> str:
            if not o:
                return 'n/a'
            return forks(
                {
                    'forks': o['forks'],
                    'forks_correct': o['forks_correct'],
                    'fork_accuracy': o['forks_correct'] / max(o['forks'], 1),
                }
            )

        lines += [
            (f'offline, {laps} laps: cued branch', [off(o) for o in offline]),
            (
                'offline: off-track events',
                [str(o['off_track_events']) if o else 'n/a' for o in offline],
            ),
        ]
    width = max(len(label) for label, _ in lines) + 2
    col = max(max(len(v) for v in values) for _, values in lines) + 2
    return '\n'.join(
        label.ljust(width) + ''.join(v.ljust(col) for v in values).rstrip()
        for label, values in lines
    )


def read_drive_bag(bag: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(trajectory (N, 2), inference ms, frame->output ms, max steps since reset) of a drive."""
    xy: list[tuple[float, float]] = []
    inference: list[float] = []
    frame_to_output: list[float] = []
    max_step = 0
    with bagio.open_bag(bag) as b:
        topics = b.topics
        if '/sim_node/pose' in topics:
            for _, msg in b.messages('/sim_node/pose'):
                xy.append((msg.pose.position.x, msg.pose.position.y))
        if '/policy_node/output' in topics:
            for t, msg in b.messages('/policy_node/output'):
                inference.append(float(msg.inference_ms))
                stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
                if stamp > 0:
                    frame_to_output.append((t - stamp) * 1e3)
                max_step = max(max_step, int(msg.step))
    return (
        np.asarray(xy, dtype=float).reshape(-1, 2),
        np.asarray(inference, dtype=float),
        np.asarray(frame_to_output, dtype=float),
        max_step,
    )


# --- processes ----------------------------------------------------------------------------------


@contextlib.contextmanager
def processes(
    commands: dict[str, list[str]], env: dict[str, str], logs: Path, cwd: Path
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Start each command (logs/<name>.log), yield them; on the way out stop them in reverse
    start order with SIGINT (as Ctrl-C), killing any that does not exit in time."""
    logs.mkdir(parents=True, exist_ok=True)
    started: dict[str, subprocess.Popen[bytes]] = {}
    files = []
    try:
        for name, cmd in commands.items():
            log = (logs / f'{name}.log').open('wb')
            files.append(log)
            started[name] = subprocess.Popen(
                cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT
            )
        yield started
    finally:
        for name in reversed(list(started)):
            stop_process(started[name], STOP_TIMEOUT)
        for log in files:
            log.close()


def drive(
    run_dir: Path,
    name: str,
    bundle: Path,
    params: Path,
    cfg: DriveConfig,
    env: dict[str, str],
    log: Callable[[str], None] = print,
) -> DriveResult:
    """One closed-loop drive through the ROS graph; see the module docstring."""
    out = run_dir / name
    out.mkdir(parents=True, exist_ok=False)
    progress_file = out / 'progress.json'
    bag = out / 'drive_bag'
    commands = drive_commands(bundle, params, progress_file, bag, cfg)
    (out / 'commands.txt').write_text('\n'.join(' '.join(c) for c in commands.values()) + '\n')
    began = time.monotonic()
    stopped_by = 'time limit'
    with processes(commands, env, out / 'logs', out) as procs:
        clock_started: float | None = None
        last_report = ''
        while True:
            time.sleep(0.25)
            now = time.monotonic()
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if dead:
                stopped_by = 'process exit'
                log(f'  {", ".join(dead)} exited early: see {out / "logs"}')
                break
            report = read_progress(progress_file)
            if report is None or not report.get('started'):
                if now - began > cfg.startup_timeout:
                    stopped_by = 'no start'
                    log(f'  the graph did not start driving in {cfg.startup_timeout:.0f} s')
                    break
                continue
            if clock_started is None:
                clock_started = now
                log(f'  driving ({name}): started after {now - began:.1f} s')
            line = (
                f'  lap {report["laps"]}/{cfg.laps}, cued branch {report["forks_correct"]}/'
                f'{report["forks"]} forks, off-track {report["off_track_events"]}'
            )
            if line != last_report:  # a line per lap, fork and off-track event
                laps = int(report['laps'])
                left = (
                    f', ~{format_duration((now - clock_started) / laps * (cfg.laps - laps))} left'
                    if 0 < laps < cfg.laps
                    else ''
                )
                log(f'{line} (sim {report["time"]:.0f} s{left})')
                last_report = line
            if report['laps'] >= cfg.laps:
                stopped_by = 'laps'
                break
            if now - clock_started > cfg.time_limit:
                log(f'  time limit ({cfg.time_limit:.0f} s) reached')
                break
    wall = time.monotonic() - began
    progress = read_progress(progress_file) or {}
    notes = []
    try:
        trajectory, inference, f2o, max_step = read_drive_bag(bag)
    except MalpiError as err:
        notes.append(f'cannot read {bag}: {err}')
        trajectory, inference, f2o, max_step = np.zeros((0, 2)), np.zeros(0), np.zeros(0), 0
    return DriveResult(
        name, progress, trajectory, inference, f2o, wall, stopped_by, bag, max_step, notes
    )


def drive_offline(
    bundle: Path,
    laps: int,
    seed: int,
    reset_every_frame: bool,
    sim: SimConfig | None = None,
) -> dict[str, Any]:
    """The same policy driving the same simulator in this process, without ROS or waiting.

    Frame, step, act - the order of the closed loop through the graph, as fast as the CPU goes
    (~0.5 s a lap): enough forks for a rate, where the real-time drives see one fork a lap.
    Returns ``SimWorld.summary()``, the median ``Policy.step`` time (preprocessing and model,
    ms: ``step_ms_median``) and the median of its part after the camera frame's fit
    (``model_ms_median``: normalization and model calls, K of each for a window policy of K
    frames, one for the LSTM; the fit is done once a frame by every kind). The policy's actions
    map onto the sim's by name.
    """
    from malpi_ros.runtime.policy import Policy  # LiteRT only: no TensorFlow in this process

    policy = Policy.from_bundle(bundle, 'litert', num_threads=1)
    world = SimWorld(sim or SimConfig(), seed=seed)
    names = world.actions.names
    missing = [n for n in policy.config.actions.names if n not in names]
    if missing:
        raise ConfigError(f'bundle {bundle} has actions {missing} the simulator does not know')
    to_sim = [names.index(n) for n in policy.config.actions.names]
    step_ms, model_ms = [], []
    for _ in range(math.ceil(laps * 120.0 / world.config.dt)):  # 120 s a lap at the most
        if world.laps >= laps:
            break
        if reset_every_frame:
            policy.reset()
        result = policy.step(world.render())
        step_ms.append(result.inference_ms)
        model_ms.append(result.inference_ms - result.times.fit_ms)
        world.step(to_sim[result.action])
    return {
        **world.summary(),
        'step_ms_median': float(np.median(step_ms)) if step_ms else 0.0,
        'model_ms_median': float(np.median(model_ms)) if model_ms else 0.0,
    }


# --- the steps ----------------------------------------------------------------------------------


def run_cli(args: list[str], env: dict[str, str], cwd: Path, log_file: Path) -> int:
    """Run ``malpi-ros ARGS``, its output shown and kept in ``log_file``."""
    cmd = [*installed('malpi-ros'), *args]
    with log_file.open('w') as keep:
        proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            keep.write(line)
        return proc.wait()


def record_step(run_dir: Path, cfg: RecordConfig, log: Callable[[str], None]) -> RecordResult:
    bag = run_dir / 'expert_bag'
    started = time.perf_counter()

    total = cfg.episodes + cfg.segments
    every = max(1, total // 10)

    def progress(episode: int, summary: dict[str, Any]) -> None:
        done = episode + 1
        if done % every == 0 or done in (cfg.episodes, total):
            left = (time.perf_counter() - started) / done * (total - done)
            log(f'  {done}/{total} episodes recorded, ~{format_duration(left)} left')

    result = record_expert(bag, cfg, SimConfig(), progress=progress, workers=recording_workers())
    right, forks = result.forks
    log(
        f'  {result.frames} frames ({result.duration / 60:.1f} min of driving) in '
        f'{time.perf_counter() - started:.0f} s: {result.laps} laps, {right}/{forks} forks on '
        f'the cued branch, {result.off_track_events} off-track'
    )
    return result


def plot(run_dir: Path, results: Sequence[DriveResult]) -> Path:
    track = get_track(SimConfig().track)
    trajectories = {}
    for r in results:
        row = r.row()
        label = f'{LABELS.get(r.name, r.name)}: {row["forks_correct"]}/{row["forks"]} forks'
        trajectories[label] = r.trajectory
    marks = {}
    for r in results:
        label = LABELS.get(r.name, r.name)
        missed = [
            d['at'] for d in r.progress.get('decisions', []) if 'at' in d and not d['correct']
        ]
        if missed:
            marks[f'cued branch missed ({label})'] = np.asarray(missed)
        if r.progress.get('off_track_at'):
            marks[f'off-track ({label})'] = np.asarray(r.progress['off_track_at'])
    return plot_trajectories(
        track,
        trajectories,
        run_dir / 'trajectories.png',
        title='policy with its LSTM state carried vs. reset before every frame',
        cue=None,
        marks=marks,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m malpi_ros.sim.demo',
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument('--out', type=Path, default=Path('demo_runs'), help='runs go under here')
    parser.add_argument('--laps', type=int, default=1, help='laps per ROS drive (default 1)')
    parser.add_argument('--time-limit', type=float, default=None, help='wall s per drive')
    parser.add_argument('--train-config', type=Path, help='default: config/sim_train.yaml')
    parser.add_argument('--params', type=Path, help='default: config/nodes/sim.yaml (installed)')
    parser.add_argument('--episodes', type=int, help='full-lap expert episodes to record')
    parser.add_argument('--segments', type=int, help='short cue-to-fork expert drives')
    parser.add_argument('--epochs', type=int, help='override the training config')
    parser.add_argument('--bundle', type=Path, help='skip recording and training: drive this')
    parser.add_argument('--seed', type=int, default=7, help='sim seed of both drives')
    parser.add_argument('--domain-id', type=int, help='ROS_DOMAIN_ID (default: environment)')
    parser.add_argument(
        '--offline-laps',
        type=int,
        default=20,
        help='also drive this many laps in-process without ROS, per mode (0: no)',
    )
    parser.add_argument('--only', choices=[n for n, _ in RUNS], help='one drive only')
    args = parser.parse_args(argv)
    try:
        return run_demo(args)
    except MalpiError as err:
        print(f'demo: error: {err}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('demo: interrupted', file=sys.stderr)
        return 130


def run_demo(args: argparse.Namespace) -> int:
    began = time.monotonic()
    env = ros_env(args.domain_id)
    run_dir = new_run_dir(args.out).resolve()
    train_config = (args.train_config or default_file('config', 'sim_train.yaml')).resolve()
    params = (args.params or default_file('config/nodes', 'sim.yaml')).resolve()
    record_cfg = _record_config(args)

    def log(line: str) -> None:
        print(line, flush=True)
        with (run_dir / 'demo.log').open('a') as f:
            f.write(line + '\n')

    log(f'demo run: {run_dir} (ROS_DOMAIN_ID {env["ROS_DOMAIN_ID"]}, localhost only)')
    timings: dict[str, float] = {}
    if args.bundle is None:
        log('1/5 recording the expert in the simulator')
        t = time.monotonic()
        record_step(run_dir, record_cfg, log)
        bag = run_dir / 'expert_bag'
        if run_cli(
            ['inspect', str(bag), '--config', str(train_config)],
            env,
            run_dir,
            run_dir / 'inspect.txt',
        ):
            raise MalpiError(f'malpi-ros inspect failed on {bag}')
        timings['record'] = time.monotonic() - t
        log(f'2/5 training (config {train_config})')
        t = time.monotonic()
        bundle = run_dir / 'bundle'
        train_args = ['train', str(bag), '--out', str(bundle), '--config', str(train_config)]
        train_args += ['--verbose', '2']
        if args.epochs is not None:
            train_args += ['--epochs', str(args.epochs)]
        if run_cli(train_args, env, run_dir, run_dir / 'train.log'):
            raise MalpiError(f'malpi-ros train failed: see {run_dir / "train.log"}')
        timings['train'] = time.monotonic() - t
    else:
        bundle = args.bundle.resolve()
        log(f'1-2/5 skipped: driving {bundle}')
    results = []
    for step, (name, reset_every_frame) in enumerate(RUNS, start=3):
        if args.only and name != args.only:
            continue
        cfg = DriveConfig(
            laps=args.laps,
            time_limit=args.time_limit or 60.0 * args.laps + 60.0,
            reset_every_frame=reset_every_frame,
            seed=args.seed,
        )
        log(f'{step}/5 driving: {LABELS[name]} ({cfg.laps} laps or {cfg.time_limit:.0f} s)')
        t = time.monotonic()
        result = drive(run_dir, name, bundle, params, cfg, env, log)
        timings[f'drive_{name}'] = time.monotonic() - t
        for note in result.notes:
            log(f'  {note}')
        if args.offline_laps:
            t = time.monotonic()
            result.offline = drive_offline(
                bundle, args.offline_laps, args.seed + 1000, reset_every_frame
            )
            o = result.offline
            log(
                f'  offline (no ROS, {o["laps"]} laps in {time.monotonic() - t:.0f} s): cued '
                f'branch {o["forks_correct"]}/{o["forks"]}, off-track {o["off_track_events"]}'
            )
        results.append(result)
    log('5/5 results')
    table = format_table(results)
    (run_dir / 'table.txt').write_text(table + '\n')
    png = plot(run_dir, results)
    timings['total'] = time.monotonic() - began
    (run_dir / 'results.json').write_text(
        json.dumps(
            {
                'bundle': str(bundle),
                'params': str(params),
                'train_config': str(train_config),
                'record': dataclasses.asdict(record_cfg),
                'drives': {r.name: {**r.row(), 'progress': r.progress} for r in results},
                'seconds': {k: round(v, 1) for k, v in timings.items()},
            },
            indent=2,
        )
        + '\n'
    )
    log(table)
    log(f'trajectories: {png}')
    log(
        'time: '
        + ', '.join(f'{k} {v / 60:.1f} min' for k, v in timings.items() if k != 'total')
        + f'; total {timings["total"] / 60:.1f} min'
    )
    log(f'everything is in {run_dir}')
    return 0 if all(r.stopped_by in ('laps', 'time limit') for r in results) else 1


def _record_config(args: argparse.Namespace) -> RecordConfig:
    """What to record: ``DEMO_RECORDING`` with the command line's overrides."""
    changes = {
        k: getattr(args, k) for k in ('episodes', 'segments') if getattr(args, k) is not None
    }
    return dataclasses.replace(DEMO_RECORDING, **changes)


if __name__ == '__main__':
    sys.exit(main())
