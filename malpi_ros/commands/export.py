"""malpi-ros export bundles/malpi_v1 --int8 [--held-out held_out_bag/ ...]

Add an int8 LiteRT step model (step_int8.tflite, about 4x smaller) to a trained bundle, for
policy_node's precision:=int8 (Policy.from_bundle(..., precision='int8')).

Full-integer quantization, calibrated on the bundle's own training recordings: frames and the
LSTM states the trained model reaches on them. The recordings are found at the paths in the
bundle's metadata (or --bags, where they are now; each bag's sha256 must match). Then the int8
and the fp32 step models are stepped side by side over held-out episodes (the validation
episodes training held out, plus any --held-out bags), the state carried from each episode's
start as on the robot. If int8 chooses fp32's action on fewer than --min-agreement (0.99) of
those frames, dynamic-range quantization (int8 weights, float activations and state) is tried
instead. The same-action fraction and the max probability difference are printed and stored in
metadata.json with the file's precision and sha256. The bundle is rewritten atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from malpi_ros.commands import fraction

MODES = ('auto', 'full_integer', 'dynamic_range')  # malpi_ros.learn.quantize.MODES (no TF here)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('bundle', type=Path, metavar='BUNDLE', help='model bundle directory')
    parser.add_argument(
        '--int8',
        action='store_true',
        required=True,
        help='add the int8 step model (step_int8.tflite); the only export for now',
    )
    parser.add_argument(
        '--bags', nargs='+', metavar='BAG', help='the training recordings, where they are now'
    )
    parser.add_argument(
        '--held-out', nargs='+', default=(), metavar='BAG', help='more held-out recordings'
    )
    parser.add_argument(
        '--quantization',
        choices=MODES,
        default='auto',
        help='auto: full_integer, or dynamic_range when it agrees too little (default: auto)',
    )
    parser.add_argument(
        '--min-agreement',
        type=fraction,
        default=0.99,
        help='same-action fraction full_integer must reach on held-out frames (default: 0.99)',
    )
    parser.add_argument(
        '--samples', type=int, default=300, help='representative frames (default: 300)'
    )
    parser.add_argument('--cache-dir', type=Path, help='reuse/keep decoded frames here')


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')  # the converter's log lines otherwise
    from malpi_ros.learn.quantize import export_int8

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = export_int8(
        args.bundle,
        bags=args.bags,
        held_out=args.held_out,
        mode=args.quantization,
        min_agreement=args.min_agreement,
        samples=args.samples,
        cache_dir=args.cache_dir,
        log=log,
    )
    print(result.format_text())
    return 0
