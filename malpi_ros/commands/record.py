"""malpi-ros record --out drive_01 --topics /camera/image_raw /cmd_vel [--duration 60]

Record live topics into a rosbag2 bag (mcap by default, or --storage sqlite3) on a machine that
has rclpy but no ``ros2 bag`` (on a robot with ROS installed, use ``ros2 bag record``: the bags
are the same format, with the same type hashes). Topics that are not up yet are waited for;
each is recorded with its publishers' QoS. Ctrl-C, SIGTERM or --duration stop it, and the bag
is closed properly in every case. Prints what was recorded; exits 1 when the bag cannot be
created (e.g. --out exists) or recording failed, and 0 otherwise, also when a topic never
appeared (it is listed).

The recording process joins the ROS graph of its environment (ROS_DOMAIN_ID; keep
ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST on a development machine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from malpi_ros.commands import positive_number

STORAGES = ('mcap', 'sqlite3')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--out',
        '-o',
        type=Path,
        required=True,
        help='the bag directory to create (must not exist)',
    )
    parser.add_argument(
        '--topics', nargs='+', required=True, metavar='TOPIC', help='topics to record'
    )
    parser.add_argument(
        '--duration',
        type=positive_number,
        metavar='S',
        help='stop after S seconds (default: Ctrl-C)',
    )
    parser.add_argument(
        '--storage', choices=STORAGES, default='mcap', help='storage format (default: mcap)'
    )


def build_parser(prog: str = 'malpi-ros record') -> argparse.ArgumentParser:
    """The parser of this verb on its own (for ``record_node.main``)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    # rclpy only here: the CLI's --help and the ROS-free verbs must not need it.
    from malpi_ros.record_node import record

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    summary = record(args.out, args.topics, storage=args.storage, duration=args.duration, log=log)
    print(summary.describe(), flush=True)
    return 1 if summary.error else 0
