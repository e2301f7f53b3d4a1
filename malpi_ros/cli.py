"""The `malpi-ros` command: inspect, train, evaluate, record, play and replay-eval recordings;
latency of a recorded run; motors-off for the robot's service.

Example:
    malpi-ros inspect my_drive_bag/
    malpi-ros train my_drive_bag/ --out bundles/malpi_v1
    malpi-ros evaluate bundles/malpi_v1 held_out_bag/

Each verb lives in its own module under ``malpi_ros.commands`` with ``add_arguments(parser)``
and ``run(args) -> int``; modules are imported only to build the parser, and must not import
TensorFlow or rclpy at module level (``--help`` stays fast, and ROS-free installs work).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from malpi_ros.errors import MalpiError

# verb -> (module under malpi_ros.commands, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    'inspect': ('inspect', 'summarize rosbag2 recordings: topics, rates, gaps, label histogram'),
    'train': ('train', 'train a conv+LSTM bundle from recordings of a person driving'),
    'evaluate': ('evaluate', 'run the robot runtime frame by frame over recordings and score it'),
    'export': ('export', 'add an int8 step model to a bundle, with its agreement with fp32'),
    'record': ('record', 'record topics into a rosbag2 (mcap) bag, for machines without ros2'),
    'recover': ('recover', 'rebuild a recording its recorder did not finish (crash, full disk)'),
    'play': ('play', 'publish a rosbag2 recording with its original timing'),
    'replay-eval': ('replay_eval', 'play a recording through policy_node and score what it did'),
    'latency': ('latency', 'where the milliseconds go, stage by stage, in a recorded run'),
    'motors-off': ('motors_off', 'zero and release the Motor HAT (after the driver died)'),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='malpi-ros',
        description='Train a conv+LSTM driving policy from rosbag2 recordings and run it.',
    )
    subparsers = parser.add_subparsers(dest='verb', metavar='VERB')
    for verb, (module_name, help_text) in VERBS.items():
        try:
            module = importlib.import_module(f'malpi_ros.commands.{module_name}')
        except ModuleNotFoundError as err:
            if err.name != f'malpi_ros.commands.{module_name}':
                raise
            continue  # the verb has not landed yet
        sub = subparsers.add_parser(verb, help=help_text, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 0
    try:
        return int(args.run(args))
    except MalpiError as err:
        print(f'malpi-ros {args.verb}: error: {err}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f'malpi-ros {args.verb}: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
