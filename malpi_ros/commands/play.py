"""malpi-ros play drive_01 [--topics /camera/image_raw] [--rate 2] [--remap /a:=/b] [--loop]

Publish a rosbag2 recording (mcap or sqlite3) on the live graph with its original timing,
scaled by --rate: the stored CDR bytes go out as they are. Images are published best effort
(sensor-data QoS, as a camera does), everything else reliable. --start S skips the first S
seconds of the bag, --duration D plays D seconds from there, --loop plays that window until
Ctrl-C. A progress line (time into the bag, messages published) goes to stderr.

When to use it: on a robot (or any machine with ROS installed), use ``ros2 bag play``. Use this
where rclpy comes from pip and there is no ``ros2 bag`` (a training workstation, CI), or when you
want these defaults. Exits 0 at the end of the bag and also when stopped with Ctrl-C/SIGTERM
(the normal way to end --loop); 1 on bad input (a missing topic is listed with what the bag has).

It joins the ROS graph of its environment (ROS_DOMAIN_ID; keep
ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST on a development machine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from malpi_ros.commands import non_negative_number, positive_number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('bag', type=Path, help='rosbag2 directory, or one .mcap/.db3 file')
    parser.add_argument(
        '--topics', nargs='+', metavar='TOPIC', help='play only these topics (default: all)'
    )
    parser.add_argument(
        '--rate',
        type=positive_number,
        default=1.0,
        help='speed factor: 2 plays twice as fast (default 1)',
    )
    parser.add_argument(
        '--start',
        type=non_negative_number,
        default=0.0,
        metavar='S',
        help='begin S s into the bag',
    )
    parser.add_argument(
        '--duration', type=positive_number, metavar='D', help='play D s of the bag (default: all)'
    )
    parser.add_argument('--loop', action='store_true', help='play again and again until Ctrl-C')
    parser.add_argument(
        '--remap',
        action='append',
        default=[],
        metavar='FROM:=TO',
        help='publish topic FROM under the name TO (repeatable)',
    )
    parser.add_argument(
        '--wait-for-subscribers',
        type=non_negative_number,
        default=1.0,
        metavar='S',
        help='wait up to S s for every topic to have a subscriber before starting (default 1)',
    )
    parser.add_argument(
        '--delay',
        type=non_negative_number,
        default=0.0,
        metavar='S',
        help='wait S s more before the first message (default 0)',
    )
    parser.add_argument('--quiet', '-q', action='store_true', help='no progress line')


def build_parser(prog: str = 'malpi-ros play') -> argparse.ArgumentParser:
    """The parser of this verb on its own (for ``player_node.main``)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from malpi_ros.bagio.replay import PlayConfig, parse_remap

    cfg = PlayConfig(
        rate=args.rate,
        start=args.start,
        duration=args.duration,
        loop=args.loop,
        topics=tuple(args.topics) if args.topics else None,
        remaps=tuple(parse_remap(r) for r in args.remap),
        wait_for_subscribers=args.wait_for_subscribers,
        delay=args.delay,
    )
    # rclpy only from here: the CLI's --help and the ROS-free verbs must not need it.
    from malpi_ros.nodes.player_node import play
    from malpi_ros.signals import stop_on_signals

    tty = sys.stderr.isatty()

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def progress(line: str) -> None:
        # On a terminal one line rewritten in place; in a log file one line per update.
        print(line, end='\r' if tty else '\n', file=sys.stderr, flush=True)

    with stop_on_signals() as stop:
        stats = play(
            args.bag,
            cfg,
            stop=stop,
            log=None if args.quiet else log,
            progress=None if args.quiet else progress,
            progress_period=0.25 if tty else 1.0,
        )
    if tty and not args.quiet:
        print(file=sys.stderr)
    print(stats.describe(), flush=True)
    return 0


def node_main(args: list[str] | None = None) -> None:
    """The ``player_node`` executable: this verb's parser handed to the node (ROS glue, lazily)."""
    from malpi_ros.nodes import player_node

    player_node.main(build_parser('player_node'), run, args)
