"""The `malpi-ros` command: one entry point for inspect, train, evaluate, record and play.

Example:
    malpi-ros --help
"""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='malpi-ros',
        description='Train a conv+LSTM driving policy from rosbag2 recordings and run it.',
    )
    parser.add_subparsers(dest='verb', metavar='VERB')
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 0
    return 0
