"""Reading recordings: frames per second of inspect, read+decode, and load_recordings.

Writes a bag of 120x160 rgb8 frames (the MaLPi camera size) at 30 Hz into a temp dir, then
times each way of reading it, once. Compare ratios within one run (numbers drift between runs).
Seen here (2 shared cores, 600 frames): raw pass ~50k frames/s, inspect ~15k, read +
deserialize + decode ~25k (rgb8 decoding is a view of the message buffer) or ~4k (jpeg),
load_recordings ~4.8k (rgb8) / ~1.6k (jpeg), a cache hit ~20k / ~11k (it still hashes the bag
to find its entry). ``--compressed`` writes jpeg frames instead of rgb8.

    .venv/bin/python bench/bench_decode.py [--frames 600] [--storage mcap] [--compressed]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'test'))  # bagfactory

import numpy as np
from bagfactory import write_bag

from malpi_ros.bagio import reader as bags
from malpi_ros.commands.inspect import inspect_bag
from malpi_ros.config import ActionTable, DatasetConfig, PreprocessConfig
from malpi_ros.learn.dataset import load_recordings
from malpi_ros.runtime.image import decode


def _timed(label: str, frames: int, func) -> float:
    start = time.perf_counter()
    func()
    seconds = time.perf_counter() - start
    rate = frames / seconds
    print(f'{label:<42} {seconds * 1000:8.1f} ms  {rate:9.0f} frames/s')
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--frames', type=int, default=600)
    parser.add_argument('--storage', choices=['mcap', 'sqlite3'], default='mcap')
    parser.add_argument('--compressed', action='store_true', help='jpeg instead of rgb8')
    args = parser.parse_args()
    n = args.frames
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 120, 160, 3), dtype=np.uint8)
    frames = [(100.0 + i / 30, images[i % 8]) for i in range(n)]
    commands = [(100.0 + i / 30 - 0.01, 0.3, 0.0) for i in range(n)]
    dataset, table = DatasetConfig(), ActionTable()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'bench_bag'
        _timed(
            f'write ({args.storage}, 120x160 {"jpeg" if args.compressed else "rgb8"})',
            n,
            lambda: write_bag(
                path,
                storage=args.storage,
                frames=frames,
                commands=commands,
                compressed=args.compressed,
            ),
        )
        size = sum(f.stat().st_size for f in bags.storage_files(path)) / 1e6
        print(f'bag: {n} frames, {size:.1f} MB')

        def read_decode() -> None:
            with bags.open_bag(path) as bag:
                for _, msg in bag.messages('/camera/image_raw'):
                    decode(msg)

        raw = _timed('summarize (raw pass, nothing decoded)', n, lambda: bags.summarize(path))
        _timed(
            'inspect (summary + labels + 5 frames)', n, lambda: inspect_bag(path, dataset, table)
        )
        dec = _timed('read + deserialize + decode', n, read_decode)
        cfg = PreprocessConfig()  # 120x120, the default model input
        cache = Path(tmp) / 'cache'
        fit = _timed(
            'load_recordings (decode + fit 120x120, cache)',
            n,
            lambda: load_recordings([path], cfg, dataset, table, cache_dir=cache),
        )
        hit = _timed(
            'load_recordings again (cache hit)',
            n,
            lambda: load_recordings([path], cfg, dataset, table, cache_dir=cache),
        )
        print(
            f'ratios: raw pass / decode {raw / dec:.1f}x, cache hit / first load {hit / fit:.1f}x'
        )


if __name__ == '__main__':
    main()
