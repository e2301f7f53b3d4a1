"""Training throughput: the bag pipeline (decode, preprocess, windowing and fit together)
against fit on the same windows already in memory as numpy arrays, in one run.

Writes a bag of 120x160 rgb8 frames (MaLPi's camera) into a temp dir; default model (120x120,
MaLPi convs, LSTM 128), windows of T=10 (stride 5). For each batch size, frames/s where
frames = windows x T per second of:
  (a) in memory: ``model.fit`` on float32 numpy arrays (normalized beforehand, not timed);
  (b) bags, cold cache: ``load_recordings`` (read, decode, fit_frame, write the uint8 cache)
      + one epoch through ``pipeline.make_dataset`` (gather + ``image.normalize`` per batch);
  (c) bags, warm cache: the same, the frames read back from the memmapped cache.
Both routes are traced once before timing (the first call compiles the train step).
Target: (b) and (c) within 1.3x of (a). Numbers drift run to run; compare ratios in one run.
Seen here (2 cores shared with other jobs, load ~4.6; 600 frames, 119 windows, --epochs 3):
batch 8: memory 848 frames/s, cold cache 684 (1.24x the time), warm cache 1047 (0.81x);
batch 32: memory 2119, cold 1846 (1.15x), warm 2100 (1.01x). ~30 s in all.

    .venv/bin/python bench/bench_train.py [--frames 600] [--batch-sizes 8 32] [--epochs 1]
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

import keras
import numpy as np
from bagfactory import synthetic_drive, write_bag

from malpi_ros.config import DatasetConfig, PolicyConfig
from malpi_ros.learn.dataset import load_recordings
from malpi_ros.learn.model import build_sequence_model
from malpi_ros.learn.pipeline import WindowSource, make_dataset
from malpi_ros.learn.train import compile_model


def _source(rec, cfg: DatasetConfig, policy: PolicyConfig) -> WindowSource:
    weights = np.ones(len(policy.actions), np.float32)
    return WindowSource(
        rec.episodes, rec.windows, cfg.window, cfg.burn_in, policy.preprocess, weights
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--frames', type=int, default=600)
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[8, 32])
    parser.add_argument('--epochs', type=int, default=1, help='timed epochs per measurement')
    parser.add_argument('--seq-len', type=int, default=10)
    parser.add_argument('--stride', type=int, default=5)
    args = parser.parse_args()

    policy = PolicyConfig()
    cfg = DatasetConfig(seq_len=args.seq_len, burn_in=0, stride=args.stride)
    with tempfile.TemporaryDirectory(prefix='bench_train_') as tmp_dir:
        tmp = Path(tmp_dir)
        drive = synthetic_drive(args.frames, height=120, width=160, dt=1 / 30, seed=0)
        bag = write_bag(tmp / 'drive', frames=drive.frames, commands=drive.commands)
        rec = load_recordings([bag], policy.preprocess, cfg, policy.actions)  # for (a)
        source = _source(rec, cfg, policy)
        rows = np.arange(len(source))
        x, y, w = source.batch(rows)  # the same windows, normalized, in memory
        frames = len(source) * cfg.window * args.epochs
        print(
            f'{args.frames} frames 120x160 -> {len(source)} windows of T={cfg.window} '
            f'(stride {cfg.stride}); in-memory arrays {x.nbytes / 2**20:.0f} MB float32; '
            f'model {policy.model.height}x{policy.model.width}, LSTM {policy.model.lstm_units}'
        )
        keras.utils.set_random_seed(0)
        model = compile_model(build_sequence_model(policy.model), 3e-4)
        print(f'{"batch":>5}  {"route":<34} {"seconds":>8} {"frames/s":>9} {"vs memory":>9}')
        for batch in args.batch_sizes:
            # Trace both routes once (their first epoch compiles); not timed.
            model.fit(x[:batch], y[:batch], sample_weight=w[:batch], batch_size=batch, verbose=0)
            model.fit(make_dataset(source, batch, shuffle=True).take(1), verbose=0, shuffle=False)

            start = time.perf_counter()
            model.fit(
                x, y, sample_weight=w, batch_size=batch, epochs=args.epochs, shuffle=True,
                verbose=0,
            )  # fmt: skip
            memory = time.perf_counter() - start

            results = [('(a) in memory (numpy arrays)', memory)]
            cache = tmp / f'cache{batch}'
            for label in ('(b) bag, cold cache', '(c) bag, warm cache'):
                start = time.perf_counter()
                loaded = load_recordings(
                    [bag], policy.preprocess, cfg, policy.actions, cache_dir=cache
                )
                dataset = make_dataset(_source(loaded, cfg, policy), batch, shuffle=True)
                model.fit(dataset, epochs=args.epochs, verbose=0, shuffle=False)
                results.append((label, time.perf_counter() - start))
            for label, seconds in results:
                print(
                    f'{batch:>5}  {label:<34} {seconds:8.2f} {frames / seconds:9.0f} '
                    f'{seconds / memory:8.2f}x'
                )
        del x, y, w


if __name__ == '__main__':
    main()
