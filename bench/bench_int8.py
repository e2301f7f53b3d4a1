"""Size and speed of the int8 step model against fp32, in one run.

Example:
    .venv/bin/python bench/bench_int8.py                 # default config, ~1 min on 2 cores
    .venv/bin/python bench/bench_int8.py --steps 200 --threads 1 2

At the default config (120x120x3, MaLPi convs, LSTM 128, 5 actions; random weights: size and
speed do not depend on what the weights are), the step model is converted three ways — fp32,
int8 full-integer (calibrated on random frames and the states the fp32 model reaches on them)
and int8 dynamic-range — and the LiteRT files are compared: bytes, and the median and p99 of a
step (model call only: frame, h, c in; probs, h', c' out), the three models timed in turn frame
by frame so a load change on a shared machine moves them alike. int8 is not faster on every
CPU: this measures, it does not assume. Agreement (same decisions, the memory) is not a speed
matter: ``malpi-ros export --int8`` measures it on a bundle's held-out recordings.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import numpy as np
from machine import describe

from malpi_ros.config import PolicyConfig

MODELS = ('fp32', 'full_integer', 'dynamic_range')


def build(directory: Path, calibration: int) -> dict[str, Path]:
    """The default policy's step model written three ways; returns name -> file."""
    import keras

    from malpi_ros.learn.export import export_litert
    from malpi_ros.learn.model import build_sequence_model, build_step_model
    from malpi_ros.learn.quantize import quantize

    cfg = PolicyConfig().model
    keras.utils.set_random_seed(0)
    step_model = build_step_model(cfg, build_sequence_model(cfg))
    paths = {name: directory / f'{name}.tflite' for name in MODELS}
    export_litert(step_model, paths['fp32'])
    samples = random_calibration(paths['fp32'], calibration)
    for name in MODELS[1:]:
        quantize(step_model, paths[name], name, samples)
    return paths


def random_calibration(fp32_path: Path, count: int) -> list[dict[str, np.ndarray]]:
    """``count`` step-model inputs for int8 calibration: random frames, with the state the fp32
    step model at ``fp32_path`` carries along them (speed does not depend on the weights).
    Also used by ``bench_node_latency.py --precision int8``."""
    from malpi_ros.runtime.litert import LiteRTStep

    fp32 = LiteRTStep(fp32_path, num_threads=1)
    rng = np.random.default_rng(0)
    h = np.zeros((1, fp32.units), np.float32)
    c = np.zeros((1, fp32.units), np.float32)
    samples = []
    for _ in range(count):
        frame = rng.standard_normal((1, *fp32.frame_shape), dtype=np.float32)
        samples.append({'frame': frame, 'h': h, 'c': c})
        _, h, c = fp32.run(frame, h, c)
    return samples


def time_steps(paths: dict[str, Path], threads: int, steps: int) -> dict[str, np.ndarray]:
    """ms per step of each model, taken in turn frame by frame (same load for all)."""
    from malpi_ros.runtime.litert import LiteRTStep

    runtimes = {name: LiteRTStep(path, num_threads=threads) for name, path in paths.items()}
    cfg = PolicyConfig().model
    rng = np.random.default_rng(1)
    frames = rng.standard_normal((16, 1, *cfg.input_shape), dtype=np.float32)
    state = {name: (np.zeros((1, cfg.lstm_units), np.float32),) * 2 for name in paths}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(steps + 10):  # the first 10: warm-up, not counted
        for name, runtime in runtimes.items():
            h, c = state[name]
            start = time.perf_counter()
            _, h, c = runtime.run(frames[i % len(frames)], h, c)
            elapsed = (time.perf_counter() - start) * 1e3
            state[name] = (h, c)
            if i >= 10:
                times[name].append(elapsed)
    return {name: np.asarray(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--steps', type=int, default=300, help='timed steps per model')
    parser.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--calibration', type=int, default=100, help='representative frames')
    args = parser.parse_args()
    print(f'machine: {describe()}')
    with tempfile.TemporaryDirectory(prefix='bench_int8_') as tmp:
        started = time.perf_counter()
        paths = build(Path(tmp), args.calibration)
        print(f'converted in {time.perf_counter() - started:.1f} s (default config, LSTM 128)')
        size = {name: path.stat().st_size for name, path in paths.items()}
        print(f'\n{"model":<16}{"bytes":>12}{"fp32 / this":>14}')
        for name in MODELS:
            print(f'{name:<16}{size[name]:>12}{size["fp32"] / size[name]:>13.2f}x')
        for threads in args.threads:
            times = time_steps(paths, threads, args.steps)
            fp32 = float(np.median(times['fp32']))
            print(f'\n{threads} thread(s), {args.steps} steps each, models in turn per frame')
            print(f'{"model":<16}{"p50 ms":>9}{"p99 ms":>9}{"speed-up p50":>14}')
            for name in MODELS:
                p50 = float(np.median(times[name]))
                p99 = float(np.percentile(times[name], 99))
                print(f'{name:<16}{p50:>9.3f}{p99:>9.3f}{fp32 / p50:>13.2f}x')
    print(f'\nmachine after: {describe()}')


if __name__ == '__main__':
    main()
