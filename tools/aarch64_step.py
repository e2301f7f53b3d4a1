"""The robot runtime's numbers on one machine, for ``tools/check_aarch64.sh`` to compare.

Runs with only the robot's runtime (numpy, OpenCV, LiteRT; no TensorFlow, no rclpy), on x86_64
in the venv and on aarch64 under qemu in an arm64 Debian root:

    aarch64_step.py frames OUT.npy [--count N]           # the frames both sides step (x86_64)
    aarch64_step.py step BUNDLE FRAMES.npy PRECISION OUT.npz
    aarch64_step.py compare X86.npz ARM.npz [--tolerance 1e-5] [--report-only]

``step`` runs ``Policy.step`` (the bundle's own preprocessing: OpenCV resize included) over the
frames in order, the state carried, one interpreter thread, and saves the probabilities and
actions. ``compare`` exits 1 when any action differs, or (unless ``--report-only``) when a
probability differs by more than the tolerance.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np

HEIGHT, WIDTH = 120, 160  # a MaLPi camera frame: the bundle's preprocessing resizes it


def make_frames(count: int, seed: int = 0) -> np.ndarray:
    """Camera-like RGB uint8 frames: smooth light, a few moving blocks, noise (seeded)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    frames = np.empty((count, HEIGHT, WIDTH, 3), np.uint8)
    blocks = rng.integers(0, [HEIGHT - 20, WIDTH - 20, 256, 256, 256], size=(4, 5))
    for i in range(count):
        light = 80 + 60 * np.sin((x + 3 * i) / 40.0) * np.cos(y / 30.0)
        frame = np.repeat(light[..., None], 3, axis=2)
        for top, left, r, g, b in blocks:
            top = (top + 2 * i) % (HEIGHT - 20)
            frame[top : top + 20, left : left + 20] = (r, g, b)
        frame += rng.normal(0.0, 8.0, frame.shape)
        frames[i] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


def step(bundle: str, frames_path: str, precision: str, out: str) -> None:
    from malpi_ros.runtime.policy import Policy

    frames = np.load(frames_path)
    policy = Policy.from_bundle(bundle, num_threads=1, precision=precision)
    started = time.perf_counter()
    results = [policy.step(frame) for frame in frames]
    seconds = time.perf_counter() - started
    np.savez(
        out,
        probabilities=np.stack([r.probabilities for r in results]),
        actions=np.array([r.action for r in results]),
        machine=platform.machine(),
    )
    print(
        f'{platform.machine()}: {precision} stepped {len(frames)} frames in {seconds:.1f} s '
        f'({1e3 * seconds / len(frames):.1f} ms a frame)'
    )


def compare(ours: str, theirs: str, tolerance: float, report_only: bool) -> int:
    a, b = np.load(ours), np.load(theirs)
    diff = float(np.max(np.abs(a['probabilities'] - b['probabilities'])))
    differ = int(np.sum(a['actions'] != b['actions']))
    frames = len(a['actions'])
    print(
        f'{a["machine"]} vs {b["machine"]}: {frames} frames, max probability difference '
        f'{diff:.3g}, actions differ on {differ} frames'
    )
    if differ or (not report_only and diff > tolerance):
        print(f'FAILED (tolerance {tolerance:g}, actions must be identical)')
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='verb', required=True)
    made = sub.add_parser('frames')
    made.add_argument('out')
    made.add_argument('--count', type=int, default=200)
    stepped = sub.add_parser('step')
    stepped.add_argument('bundle')
    stepped.add_argument('frames')
    stepped.add_argument('precision', choices=('fp32', 'int8'))
    stepped.add_argument('out')
    compared = sub.add_parser('compare')
    compared.add_argument('ours')
    compared.add_argument('theirs')
    compared.add_argument('--tolerance', type=float, default=1e-5)
    compared.add_argument('--report-only', action='store_true')
    args = parser.parse_args()
    if args.verb == 'frames':
        np.save(args.out, make_frames(args.count))
        return 0
    if args.verb == 'step':
        step(args.bundle, args.frames, args.precision, args.out)
        return 0
    return compare(args.ours, args.theirs, args.tolerance, args.report_only)


if __name__ == '__main__':
    sys.exit(main())
