"""malpi-ros evaluate bundles/malpi_v1 held_out_bag/ [more_bags ...] --out eval_v1/

Run a trained bundle over recordings exactly as the robot would: each episode (a bag, split
at gaps) in time order, frame by frame through the step runtime (LiteRT by default, or
--backend keras), the LSTM state reset at each episode start and carried within it. Frames are
labelled with the bundle's action table and the labelling rules it was trained with.

Prints per-action precision/recall/F1, accuracy, the confusion matrix, and the parity check:
how far the step runtime's probabilities are from the sequence model (the bundle's
model.keras, each episode as one sequence) on the same frames, and how often both pick the same
action. --no-parity skips that check (and TensorFlow with it).

--reset-every-frame zeroes the state before every step: the policy without its memory, to
compare against. Accuracy is also reported by frames since the last reset (1-20, 21-50,
51-200, 201+), on all frames or on the frames labelled with --focus actions: memory that drifts
on long drives shows as a falling last bucket. --out DIR writes report.json (per-frame stamps,
labels, actions and probabilities of every episode), report.txt and confusion.png. --json
prints report.json's document instead of the text. Exits 1, naming the bag and topic, when a
bag cannot be used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BACKENDS = (
    'litert',
    'keras',
)  # malpi_ros.runtime.policy.BACKENDS; not imported here to keep --help fast


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('bundle', type=Path, metavar='BUNDLE', help='model bundle directory')
    parser.add_argument('bags', nargs='+', metavar='BAG', help='rosbag2 directory or .mcap file')
    parser.add_argument(
        '--backend', choices=BACKENDS, default='litert', help='step runtime (default: litert)'
    )
    parser.add_argument(
        '--precision',
        choices=('fp32', 'int8'),
        default='fp32',
        help='the step model: fp32, or int8 (added by malpi-ros export BUNDLE --int8)',
    )
    parser.add_argument('--out', type=Path, help='write report.json, report.txt, confusion.png')
    parser.add_argument('--json', action='store_true', help='print one JSON document')
    parser.add_argument(
        '--reset-every-frame',
        action='store_true',
        help='zero the LSTM state before every frame (the no-memory ablation)',
    )
    parser.add_argument(
        '--no-parity',
        dest='parity',
        action='store_false',
        help='skip the comparison with the sequence model (no TensorFlow)',
    )
    parser.add_argument('--image-topic', help='camera topic (default: the one image topic)')
    parser.add_argument('--cmd-topic', help='command topic (default: the one Twist topic)')
    parser.add_argument('--cache-dir', type=Path, help='reuse/keep decoded frames here')
    parser.add_argument(
        '--threads', type=int, default=2, help='LiteRT interpreter threads (default: 2)'
    )
    parser.add_argument(
        '--focus',
        nargs='+',
        default=(),
        metavar='ACTION',
        help='report accuracy by frames since the last reset on the frames labelled with these '
        'actions (e.g. the turns that need memory; default: all frames)',
    )


def run(args: argparse.Namespace) -> int:
    from malpi_ros.learn.evaluate import evaluate_bundle, write_report

    def log(line: str) -> None:
        if not args.json:
            print(line, file=sys.stderr, flush=True)

    report = evaluate_bundle(
        args.bundle,
        args.bags,
        backend=args.backend,
        reset_every_frame=args.reset_every_frame,
        parity=args.parity,
        image_topic=args.image_topic,
        cmd_topic=args.cmd_topic,
        cache_dir=args.cache_dir,
        num_threads=args.threads,
        precision=args.precision,
        focus=args.focus,
        log=log,
    )
    if args.out is not None:
        paths = write_report(report, args.out)
        log(f'wrote {", ".join(str(p) for p in paths.values())}')
    if args.json:
        json.dump(report.to_dict(), sys.stdout, allow_nan=False)
        print()
    else:
        print(report.format_text())
    return 0
