"""malpi-ros latency run_bag/ [--json]

Where the milliseconds go between the camera and the motors, from a recorded run: a bag with
policy_node's ``~/output`` and motor_driver_node's ``~/applied`` (``malpi-ros record --topics
/policy_node/output /motor_driver_node/applied ...``, ``ros2 bag record``, the demo's drive).
Prints p50/p99/max per stage — frame stamp -> received by policy_node -> decoded and
preprocessed -> model step done -> cmd_vel published -> applied by the motor driver — and end
to end (frame stamp -> applied), and the share of the end-to-end median the stages' medians
account for (and the share of the mean: the stages are contiguous, so each frame's add up to
its end to end, and their means add up to the mean; medians of skewed parts need not). An
applied command is related to its frame by its publish stamp (a Twist has no
header; see malpi_ros/runtime/latency.py). The stamps must share one clock: the nodes on one
machine, ``use_sim_time`` off. Exits 1, naming the bag and the topic, when a topic is missing,
empty, ambiguous or recorded without stamps. Reads the bag only; no ROS needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('bag', type=Path, metavar='RUN_BAG', help='rosbag2 directory or .mcap')
    parser.add_argument('--output-topic', help="policy_node's ~/output (default: by its type)")
    parser.add_argument(
        '--applied-topic', help="motor_driver_node's ~/applied (default: by its type)"
    )
    parser.add_argument('--json', action='store_true', help='print one JSON document')


def _number(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)


def run(args: argparse.Namespace) -> int:
    from malpi_ros.bagio.stamps import read_stamps
    from malpi_ros.errors import BagError

    stamps = read_stamps(args.bag, args.output_topic, args.applied_topic)
    result = stamps.report()
    if not result.matched:
        raise BagError(
            f'bag {stamps.bag}, topic {stamps.applied_topic}: no applied command matches a '
            f'command of {stamps.output_topic} ({result.published} published, '
            f'{len(stamps.applied)} applied by the policy): the driver never applied them, or '
            'the nodes ran on different clocks (use_sim_time, two machines)'
        )
    if args.json:
        rows = [*result.stages, result.end_to_end]
        doc = {
            'bag': stamps.bag,
            'output_topic': stamps.output_topic,
            'applied_topic': stamps.applied_topic,
            'outputs': result.outputs,
            'published': result.published,
            'matched': result.matched,
            'overridden': stamps.overridden,
            'share': _number(result.share),
            'share_of_mean': _number(result.share_of_mean),
            'stages': {
                s.name: {
                    k: (_number(v) if isinstance(v, float) else v)
                    for k, v in dataclasses.asdict(s).items()
                    if k != 'name'
                }
                for s in rows
            },
        }
        print(json.dumps(doc, indent=2))
        return 0
    print(f'{stamps.bag}: {stamps.output_topic} + {stamps.applied_topic}')
    print(result.format())
    if stamps.overridden:
        print(f'({stamps.overridden} outputs of teleop takeovers left out)')
    return 0
