"""malpi-ros record --out drive_01 --topics /camera/image_raw /cmd_vel [--duration 60]

Record live topics into a rosbag2 bag (mcap by default, or --storage sqlite3) on a machine that
has rclpy but no ``ros2 bag`` (on a robot with ROS installed, use ``ros2 bag record``: the bags
are the same format, with the same type hashes). Topics that are not up yet are waited for;
each is recorded with its publishers' QoS. Ctrl-C, SIGTERM or --duration stop it, and the bag
is closed properly in every case. Prints what was recorded; exits 1 when the bag cannot be
created (e.g. --out exists) or recording failed, and 0 otherwise, also when a topic never
appeared (it is listed).

The bag is written as storage files of --max-bag-duration seconds (default 60) and/or
--max-bag-size bytes, like `ros2 bag record`: metadata.yaml lists every closed file, the open
one is flushed about every second, so a crash (kill -9, power cut) loses at most the last
second and `malpi-ros recover BAG` rebuilds the open file. The first write error (a full
disk) stops the recording with one line; the bag then holds the closed files, and the summary
counts only those.

The recording process joins the ROS graph of its environment (ROS_DOMAIN_ID; keep
ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST on a development machine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from malpi_ros.commands import non_negative_number, positive_number

STORAGES = ('mcap', 'sqlite3')
DEFAULT_SPLIT_S = 60.0  # a crash or a full disk costs at most this much of the recording


def _bytes(text: str) -> int:
    """argparse type: a whole number of bytes >= 0."""
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f'expected a whole number of bytes, got {text!r}'
        ) from err
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be >= 0, got {text!r}')
    return value


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
    parser.add_argument(
        '--max-bag-duration',
        type=non_negative_number,
        default=DEFAULT_SPLIT_S,
        metavar='S',
        help='start a new storage file every S seconds of recording (0: never; default: '
        f'{DEFAULT_SPLIT_S:g}); a crash loses at most the open file, and recover rebuilds it',
    )
    parser.add_argument(
        '--max-bag-size',
        type=_bytes,
        default=0,
        metavar='BYTES',
        help='start a new storage file when the open one reaches BYTES (0: never, the default)',
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
    from malpi_ros.nodes.record_node import record

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    summary = record(
        args.out,
        args.topics,
        storage=args.storage,
        duration=args.duration,
        max_duration=args.max_bag_duration,
        max_bytes=args.max_bag_size,
        log=log,
    )
    print(summary.describe(), flush=True)
    return 1 if summary.error else 0


def node_main(args: list[str] | None = None) -> None:
    """The ``record_node`` executable: this verb's parser handed to the node (ROS glue, lazily)."""
    from malpi_ros.nodes import record_node

    record_node.main(build_parser('record_node'), args)
