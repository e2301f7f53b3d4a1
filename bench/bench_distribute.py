"""Training past one process: samples/s of ``malpi-ros train`` with one and two workers
(MultiWorkerMirroredStrategy on loopback), and the strategy's overhead on one worker against
plain ``fit``, in one run.

Writes small bags (synthetic drives) into a temp dir and trains the carried-state recipe on
them in separate processes, one per worker (as on several machines): ``none`` (plain fit),
``mirrored`` (MirroredStrategy: one CPU replica here), ``multi-worker`` with a TF_CONFIG of one
worker, then of two; every run --rounds times, alternating, and the fastest round kept (the
machine is shared: a busy minute slows one run, not one route). Samples/s = the frames of every
training chunk of an epoch (all workers together) / the median time of an epoch after the first
(which traces the step; the slowest worker's, as workers step together). Target: the
strategy on one worker within 1.15x of plain fit. On 2 cores two workers cannot be faster than
one: they share the cores and add a gradient all-reduce over loopback every step.

    nice -n 10 .venv/bin/python bench/bench_distribute.py [--bags 8] [--frames 120] [--epochs 5]
        [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'test'))  # bagfactory, support
sys.path.insert(0, str(Path(__file__).resolve().parent))  # machine

CONFIG = """
model: {{height: 48, width: 64, lstm_units: 32}}
dataset: {{burn_in: 4, seq_len: 16}}
train: {{epochs: {epochs}, batch_size: 8, min_epochs: {epochs}, val_fraction: 0.0}}
"""


def worker(args: argparse.Namespace) -> None:
    """One training process: prints its epoch times and training frames as JSON."""
    import keras

    from malpi_ros.config_file import build_configs, read_config_file
    from malpi_ros.learn.train import train

    class EpochTimes(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.times: list[float] = []
            self.steps: list[float] = []  # every step's seconds, epochs after the first

        def on_epoch_begin(self, epoch: int, logs: object = None) -> None:
            self.started = time.perf_counter()

        def on_train_batch_begin(self, batch: int, logs: object = None) -> None:
            self.step_started = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: object = None) -> None:
            if self.times:
                self.steps.append(time.perf_counter() - self.step_started)

        def on_epoch_end(self, epoch: int, logs: object = None) -> None:
            self.times.append(time.perf_counter() - self.started)

    policy, dataset, train_cfg = build_configs(
        read_config_file(Path(args.config)), {'distribute': args.mode}
    )
    times = EpochTimes()
    lines: list[str] = []
    train(
        args.bags, args.out, policy, dataset, train_cfg, verbose=0, callbacks=[times],
        log=lines.append,
    )  # fmt: skip
    print(json.dumps({'times': times.times, 'steps': times.steps, 'log': lines}))


def _run(
    tmp: Path, name: str, mode: str, workers: int, bags: list[Path], config: Path
) -> list[dict[str, object]]:
    """Every worker of one training run, started together; their JSON reports."""
    from support import free_ports

    cluster = {'worker': [f'127.0.0.1:{p}' for p in free_ports(workers)]}
    procs = []
    for index in range(workers):
        env = dict(os.environ, PYTHONUNBUFFERED='1')
        if mode == 'multi-worker':
            task = {'type': 'worker', 'index': index}
            env['TF_CONFIG'] = json.dumps({'cluster': cluster, 'task': task})
        cmd = [sys.executable, '-P', __file__, '--worker', mode, '--config', str(config)]
        cmd += ['--out', str(tmp / name), *map(str, bags)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    reports = []
    for proc in procs:
        out, _ = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f'{name}: a worker failed ({proc.returncode})')
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--bags', type=int, default=8)
    parser.add_argument('--frames', type=int, default=120, help='frames per bag')
    parser.add_argument('--epochs', type=int, default=5)
    parser.add_argument('--rounds', type=int, default=2, help='runs of each route, alternating')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    parser.add_argument('--config', help=argparse.SUPPRESS)
    parser.add_argument('--out', help=argparse.SUPPRESS)
    parser.add_argument('files', nargs='*', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.mode, args.bags = args.worker, args.files
        worker(args)
        return

    from bagfactory import synthetic_drive, write_bag
    from machine import describe

    print(describe())
    with tempfile.TemporaryDirectory(prefix='bench_distribute_') as tmp_dir:
        tmp = Path(tmp_dir)
        bags = []
        for i in range(args.bags):
            drive = synthetic_drive(args.frames, seed=i, start=1000.0 + 1000 * i, height=48,
                                    width=64)  # fmt: skip
            bags.append(write_bag(tmp / f'd{i}', frames=drive.frames, commands=drive.commands))
        config = tmp / 'bench.yaml'
        config.write_text(CONFIG.format(epochs=args.epochs))
        frames = args.bags * args.frames  # every frame is in one training chunk an epoch
        print(
            f'{args.bags} bags x {args.frames} frames 48x64, LSTM 32, chunks of 16, global '
            f'batch 8 lanes, {args.epochs} epochs (the first not timed)'
        )
        runs = [
            ('plain fit (none)', 'none', 1),
            ('mirrored, 1 CPU replica', 'mirrored', 1),
            ('multi-worker, 1 worker', 'multi-worker', 1),
            ('multi-worker, 2 workers', 'multi-worker', 2),
        ]
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.rounds):
            for label, mode, workers in runs:
                reports = _run(tmp, f'b{mode}{workers}', mode, workers, bags, config)
                per_epoch = [max(r['times'][e] for r in reports) for e in range(1, args.epochs)]
                seconds = statistics.median(per_epoch)
                step = statistics.median(reports[0]['steps'])
                if label not in best or seconds < best[label][0]:
                    best[label] = (seconds, step)
        # step: the median training step (chief); the rest of an epoch is what it costs beside
        # its steps (opening the epoch's batches, its end), per epoch, not per step.
        print(f'{"run":<32} {"s/epoch":>8} {"samples/s":>10} {"vs plain":>9} {"ms/step":>8}')
        plain = best[runs[0][0]][0]
        for label, (seconds, step) in best.items():
            print(
                f'{label:<32} {seconds:8.2f} {frames / seconds:10.0f} {seconds / plain:8.2f}x '
                f'{step * 1000:8.0f}'
            )


if __name__ == '__main__':
    main()
