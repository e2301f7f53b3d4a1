"""Per-frame cost of running the policy on the robot, against the reference approaches.

Example:
    .venv/bin/python bench/bench_policy.py            # default config, ~2 min on 2 cores
    .venv/bin/python bench/bench_policy.py --frames 100 --seed-frames 20

At the default config (120x120x3, MaLPi convs, LSTM 128, 5 actions), from one run:
(a) the seed's route: a stateful Keras model (batch_shape (1, 1, ...)), ``model.predict`` per
frame; (b) the peers' (DonkeyCar) route: the stateless sequence model over a window of the last
3 frames at every step, called directly through a ``tf.function``; (c) our Keras step
(``tf.function``, explicit state); (d) our LiteRT step (XNNPACK); each as a speed-up over (a).
Model calls only, on preprocessed frames; (e) adds preprocessing of a 120x160 camera frame
(``Policy.step``). (d) and (e) run on one interpreter, timed frame by frame in turn, so their
ratio (target <= 1.3x) is not moved by the load of a shared machine changing between two
blocks, nor by two copies of the weights evicting each other from the caches.

Then the stages of the frame path one by one (decode an rgb8 message, fit = crop + resize,
normalize, the LiteRT step at 1, 2 and 4 threads, ``Policy.step`` and its own split), the compute
floor (FLOPs counted from the config / numpy float32 matmul throughput measured here), a memory
floor (weights / measured copy bandwidth: at batch 1 the LSTM's input kernel is a matrix-vector
product that reads each of its 15.9 MB of weights once per frame for 2 FLOPs, so it is bound by
memory, not by the matmul rate), and the peak RSS and start-up time of a process that only
loads a bundle with the LiteRT backend and steps it once. The CPU (cores, AVX-512 or not) and
the load are printed with the figures. Numbers drift run to run; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import numpy as np
from machine import describe, load

from malpi_ros.config import ModelConfig, PolicyConfig
from malpi_ros.model_cost import count_flops, weight_bytes

WINDOW = 3  # the peers' window of recent frames


def matmul_gflops(n: int = 1024, repeats: int = 30) -> float:
    """Best float32 matmul throughput numpy reaches here (all cores numpy's BLAS uses).

    Best of ``repeats``: the floor is what the hardware can do, not what it did while shared.
    """
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    for _ in range(5):  # warm-up: BLAS threads start, clocks ramp up
        a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def copy_gbps(megabytes: int = 64, repeats: int = 10) -> float:
    """Memory bandwidth seen by a large copy, counting bytes read plus bytes written."""
    src = np.ones(megabytes * 2**18, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * src.nbytes / best / 1e9


def interleaved_ms(
    steps: dict[str, Callable[[int], object]], frames: int
) -> dict[str, np.ndarray]:
    """Per-frame ms of each step, timed in turn frame by frame (same load for all)."""
    for i in range(3):
        for step in steps.values():
            step(i)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(frames):
        for name, step in steps.items():
            times[name].append(_timed(lambda i=i, step=step: step(i)) * 1e3)
    return {name: np.array(ms) for name, ms in times.items()}


def l3_cache_mb() -> str:
    """The L3 size as the kernel reports it ('?' where it does not)."""
    try:
        size = Path('/sys/devices/system/cpu/cpu0/cache/index3/size').read_text().strip()
    except OSError:
        return '?'
    return str(int(size[:-1]) // 1024) if size.endswith('K') else size


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def per_frame_ms(step: Callable[[int], object], frames: int, warmup: int = 3) -> np.ndarray:
    for i in range(warmup):
        step(i)
    return np.array([_timed(lambda i=i: step(i)) * 1e3 for i in range(frames)])


def stage_rows(
    camera: np.ndarray, config: PolicyConfig, frames: int
) -> list[tuple[str, np.ndarray]]:
    """Decode, fit and normalize alone, as ``Policy.step`` runs them (reused output buffer)."""
    from malpi_ros.runtime import image

    height, width = camera.shape[1:3]
    messages = [
        SimpleNamespace(height=height, width=width, encoding='rgb8', step=width * 3,
                        is_bigendian=0, data=f.tobytes())
        for f in camera
    ]  # fmt: skip
    n = len(camera)
    fitted = [image.fit_frame(f, config.preprocess) for f in camera]
    buffer = np.empty(fitted[0].shape, np.float32)
    pre = config.preprocess
    return [
        (
            f'decode ({height}x{width} rgb8 message -> RGB array)',
            per_frame_ms(lambda i: image.decode(messages[i % n]), frames),
        ),
        (
            f'fit (crop + resize {height}x{width} -> {pre.height}x{pre.width}, INTER_AREA)',
            per_frame_ms(lambda i: image.fit_frame(camera[i % n], pre), frames),
        ),
        (
            f'normalize ({pre.normalization!r}, into a reused float32 buffer)',
            per_frame_ms(lambda i: image.normalize(fitted[i % n], pre, out=buffer), frames),
        ),
    ]


def seed_model(sequence_model, cfg: ModelConfig):
    """The seed's model: TimeDistributed convs, stateful LSTM, fixed batch_shape (1, 1, ...)."""
    import keras

    inputs = keras.Input(batch_shape=(1, 1, *cfg.input_shape))
    x = inputs
    for spec in cfg.convs:
        conv = keras.layers.Conv2D(
            spec.filters, spec.kernel, strides=spec.stride, activation=cfg.conv_activation
        )
        x = keras.layers.TimeDistributed(conv)(x)
    x = keras.layers.TimeDistributed(keras.layers.Flatten())(x)
    x = keras.layers.LSTM(
        cfg.lstm_units, activation=cfg.lstm_activation, stateful=True, return_sequences=True
    )(x)
    outputs = keras.layers.Dense(cfg.num_actions, activation='softmax')(x)
    model = keras.Model(inputs, outputs)
    model.set_weights(sequence_model.get_weights())
    return model


CHILD = """
import json, resource, sys, time
import numpy as np
from malpi_ros.runtime.policy import Policy
policy = Policy.from_bundle(sys.argv[1], backend='litert', num_threads=2)
policy.step(np.zeros((120, 160, 3), np.uint8))
done = time.time()
with open('/proc/self/status') as f:
    hwm_kb = int(f.read().split('VmHWM:')[1].split()[0])
roots = {name.split('.')[0] for name in sys.modules}
print(json.dumps({'done': done, 'maxrss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  'hwm_kb': hwm_kb, 'tensorflow': 'tensorflow' in roots or 'keras' in roots}))
"""


def litert_process(bundle_dir: Path) -> dict[str, float]:
    """Start a LiteRT-only process that loads the bundle and steps once: wall time, peak RSS.

    Peak RSS is the child's ``VmHWM`` (its own address space since its exec). Its
    ``ru_maxrss`` is reported too, but on Linux it keeps the high-water mark of the pages the
    child shared with this (TensorFlow-sized) parent right after the fork, so it overstates.
    """
    start = time.time()
    out = subprocess.run(
        [sys.executable, '-c', CHILD, str(bundle_dir)],
        cwd=tempfile.gettempdir(),  # never the repo: the installed package is what runs
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        'startup_s': report['done'] - start,
        'peak_rss_mb': report['hwm_kb'] / 1024,
        'ru_maxrss_mb': report['maxrss_kb'] / 1024,
        'imports_tensorflow': report['tensorflow'],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--frames', type=int, default=200, help='frames timed per route')
    parser.add_argument('--seed-frames', type=int, default=40, help='frames for route (a)')
    parser.add_argument(
        '--threads', type=int, default=0, help='LiteRT threads for (d), (e); 0 = auto, as the node'
    )
    args = parser.parse_args(argv)
    # Measured before and after the routes; the best counts (other processes on a shared
    # machine only ever slow it down, and a floor must not be pessimistic).
    load_start = load()
    gflops_before = matmul_gflops()

    import keras
    import tensorflow as tf

    from malpi_ros.learn.export import save_bundle
    from malpi_ros.learn.keras_step import KerasStep
    from malpi_ros.learn.model import build_sequence_model
    from malpi_ros.runtime import image
    from malpi_ros.runtime.litert import LiteRTStep
    from malpi_ros.runtime.policy import Policy

    config = PolicyConfig()
    cfg = config.model
    keras.utils.set_random_seed(0)
    model = build_sequence_model(cfg)
    rng = np.random.default_rng(0)
    camera = rng.integers(0, 256, (args.frames + 8, 120, 160, 3), dtype=np.uint8)
    x = np.stack([image.preprocess(f, config.preprocess) for f in camera])[:, np.newaxis]
    n = len(x)
    units = np.zeros((1, cfg.lstm_units), np.float32)

    rows: list[tuple[str, np.ndarray]] = []

    seed = seed_model(model, cfg)
    rows.append(
        (
            '(a) seed: stateful Keras, `model.predict` per frame',
            per_frame_ms(lambda i: seed.predict(x[i % n][None], verbose=0), args.seed_frames),
        )
    )

    window = tf.function(
        lambda frames: model(frames, training=False)[0, -1],
        input_signature=[tf.TensorSpec((1, WINDOW, *cfg.input_shape), tf.float32)],
    )
    recent: deque[np.ndarray] = deque([x[0, 0]] * WINDOW, maxlen=WINDOW)

    def peers(i: int) -> object:
        recent.append(x[i % n, 0])
        return window(np.stack(recent)[np.newaxis]).numpy()

    rows.append(
        (
            f'(b) peers: sequence model over the last {WINDOW} frames (tf.function call)',
            per_frame_ms(peers, args.frames),
        )
    )

    keras_step = KerasStep(model, cfg)
    state = [units, units]

    def ours_keras(i: int) -> object:
        probs, state[0], state[1] = keras_step.run(x[i % n], state[0], state[1])
        return probs

    rows.append(
        (
            '(c) ours: Keras step (tf.function, explicit h, c)',
            per_frame_ms(ours_keras, args.frames),
        )
    )

    stages: list[tuple[str, np.ndarray]] = []
    with tempfile.TemporaryDirectory(prefix='malpi_bench_') as tmp:
        bundle_dir = save_bundle(Path(tmp) / 'bundle', model, config, dt=0.1, seq_len=10)
        lite = LiteRTStep(bundle_dir / 'step.tflite', num_threads=args.threads)
        lstate = [units, units]

        def ours_litert(i: int) -> object:
            probs, lstate[0], lstate[1] = lite.run(x[i % n], lstate[0], lstate[1])
            return probs

        # (e) on the same interpreter as (d): one copy of the weights in the caches for both.
        policy = Policy(lite, config, dt=0.1)
        results = []

        def ours_policy(i: int) -> object:
            results.append(policy.step(camera[i % n]))
            return results[-1]

        both = interleaved_ms({'d': ours_litert, 'e': ours_policy}, args.frames)
        rows.append((f'(d) ours: LiteRT step (XNNPACK, {lite.num_threads} threads)', both['d']))
        rows.append(
            ('(e) ours: `Policy.step` (LiteRT + preprocess 120x160 -> 120x120)', both['e'])
        )
        timed = results[3:]  # the three warm-up steps left out
        stages += stage_rows(camera, config, args.frames)
        for threads in (1, 2, 4):
            step = LiteRTStep(bundle_dir / 'step.tflite', num_threads=threads)
            state = [units, units]

            def at_threads(i: int, step: LiteRTStep = step, state: list = state) -> object:
                probs, state[0], state[1] = step.run(x[i % n], state[0], state[1])
                return probs

            stages.append(
                (f'LiteRT step, {threads} thread(s)', per_frame_ms(at_threads, args.frames))
            )
        stages.append(('`Policy.step`, all of it (= (e))', both['e']))
        for part in ('fit', 'normalize', 'model'):
            stages.append(
                (
                    f'`Policy.step`, its own `{part}_ms`',
                    np.array([getattr(r.times, f'{part}_ms') for r in timed]),
                )
            )
        process = litert_process(bundle_dir)

    flops = count_flops(cfg)
    total_flops = sum(flops.values())
    gflops_after = matmul_gflops()
    gflops = max(gflops_before, gflops_after)
    compute_floor_ms = total_flops / (gflops * 1e9) * 1e3
    gbps = copy_gbps()
    weights = weight_bytes(cfg)
    memory_floor_ms = weights / (gbps / 2 * 1e9) * 1e3  # read once: half a copy's traffic

    base = float(np.median(rows[0][1]))
    print(f'\nmachine: {describe()} (at the start: load {load_start:.2f})')
    print(
        f'\n## Policy step, default config ({cfg.height}x{cfg.width}x{cfg.channels}, '
        f'convs {[f"{c.filters}@{c.kernel}x{c.kernel}/{c.stride}" for c in cfg.convs]}, '
        f'LSTM {cfg.lstm_units}, {cfg.num_actions} actions)\n'
    )
    print('| route | frames | median ms | p99 ms | speed-up vs (a) |')
    print('|---|---:|---:|---:|---:|')
    for name, ms in rows:
        med = float(np.median(ms))
        print(
            f'| {name} | {len(ms)} | {med:.3f} | {np.percentile(ms, 99):.3f} | {base / med:.1f}x |'
        )
    lite_ms = float(np.median(rows[3][1]))
    policy_ms = float(np.median(rows[4][1]))
    p10 = float(np.percentile(rows[4][1], 10)) / float(np.percentile(rows[3][1], 10))
    print(
        f'\n(e) / (d), timed in turn: **{policy_ms / lite_ms:.2f}x** of medians, {p10:.2f}x of '
        'p10s (what the code costs when the scheduler leaves it alone) (target <= 1.3x)\n'
    )
    print('| stage of the frame path | frames | median ms | p99 ms |')
    print('|---|---:|---:|---:|')
    for name, ms in stages:
        print(f'| {name} | {len(ms)} | {np.median(ms):.3f} | {np.percentile(ms, 99):.3f} |')
    print()
    print('| measure | value |')
    print('|---|---:|')
    detail = ', '.join(f'{k} {v / 1e6:.2f}' for k, v in flops.items())
    print(f'| FLOPs per frame | {total_flops / 1e6:.1f} M ({detail}) |')
    print(
        f'| numpy float32 matmul (1024^2), best of before/after | {gflops:.1f} GFLOP/s '
        f'({gflops_before:.1f} / {gflops_after:.1f}) |'
    )
    print(f'| compute floor (FLOPs / matmul rate) | {compute_floor_ms:.3f} ms |')
    print(f'| (d) / compute floor | {lite_ms / compute_floor_ms:.2f}x (target <= 3x) |')
    print(f'| weights streamed per frame | {weights / 1e6:.1f} MB |')
    print(f'| copy bandwidth (read + write) | {gbps:.1f} GB/s |')
    print(
        f'| DRAM floor (weights / read bandwidth; binds only if the weights miss the '
        f'{l3_cache_mb()} MB L3) | {memory_floor_ms:.3f} ms '
        f'((d) = {lite_ms / memory_floor_ms:.2f}x) |'
    )
    print(f'| (d) speed-up vs (a) | {base / lite_ms:.0f}x (target >= 50x) |')
    print(
        f'| LiteRT-only process: peak RSS (VmHWM) | {process["peak_rss_mb"]:.0f} MB '
        f'(target < 250; ru_maxrss {process["ru_maxrss_mb"]:.0f} MB, inherited from the fork) |'
    )
    print(
        f'| LiteRT-only process: start -> first step | {process["startup_s"]:.2f} s '
        '(target < 1.5) |'
    )
    print(f'| LiteRT-only process imported TensorFlow/Keras | {process["imports_tensorflow"]} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
