"""malpi-ros replay-eval bundles/malpi_v1 drive_07 --out runs/replay_07 [--realtime]

Open-loop evaluation through the live graph: evaluate the bundle offline on the recording
(as ``malpi-ros evaluate`` does), then start the installed policy_node with the bundle, play the
recording's camera frames into it episode by episode (``~/reset`` before each, unless
--no-reset-each-episode), record its cmd_vel and ~/output into RUN_DIR/run_bag (mcap), and
report per episode: agreement of the node's actions with the human's commands and with
evaluate's actions on the same frames (every frame where they differ is listed, with why:
skipped, late, missing, after a skip, another reset, or a plain difference), frames
played/stepped/skipped, and the latency from a frame to its command (p50/p99).

Default (lockstep): each frame is sent once the node answered the one before, and the node's dt
gate and age check are off, so it steps every frame evaluate stepped: the two must agree on
every one. --realtime sends frames at the bag's timing (times --rate) to a node with its own
defaults, as on the robot. The node and its topics live in the namespace /replay_eval, so a
replay never drives a robot listening on /cmd_vel.

Writes RUN_DIR/report.json, report.txt, actions.png (human vs policy over time), run_bag/ and
policy_node.log. Exits 0 when done, 130 when stopped with Ctrl-C/SIGTERM (the partial report
and the run bag are still written and valid), 1 on bad input or when the node fails.
It joins the ROS graph of its environment (ROS_DOMAIN_ID; keep
ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST on a development machine).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from malpi_ros.commands import positive_number

REPORT_FILE = 'report.json'
TEXT_FILE = 'report.txt'
PLOT_FILE = 'actions.png'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('bundle', type=Path, help='model bundle directory (malpi-ros train)')
    parser.add_argument('bag', type=Path, help='rosbag2 recording with camera frames and cmd_vel')
    parser.add_argument(
        '--out', '-o', type=Path, required=True, help='run directory to create (must be empty)'
    )
    parser.add_argument(
        '--backend', choices=('litert', 'keras'), default='litert', help='runtime (default litert)'
    )
    parser.add_argument('--image-topic', help='camera topic (default: the one image topic)')
    parser.add_argument('--cmd-topic', help='command topic (default: the one Twist topic)')
    parser.add_argument(
        '--reset-each-episode',
        action=argparse.BooleanOptionalAction,
        default=True,
        help="call the node's ~/reset before each episode, as evaluation resets (default on)",
    )
    parser.add_argument(
        '--realtime',
        action='store_true',
        help="publish at the bag's timing to a node with its robot defaults (default: lockstep)",
    )
    parser.add_argument(
        '--rate', type=positive_number, default=1.0, help='speed factor for --realtime (default 1)'
    )
    parser.add_argument(
        '--frame-timeout',
        type=positive_number,
        default=5.0,
        metavar='S',
        help='lockstep: wait at most S s for each output (default 5)',
    )
    parser.add_argument(
        '--startup-timeout',
        type=positive_number,
        default=60.0,
        metavar='S',
        help='wait at most S s for policy_node to come up (default 60)',
    )
    parser.add_argument(
        '--param',
        action='append',
        default=[],
        metavar='NAME:=VALUE',
        help='an extra policy_node parameter (repeatable), e.g. num_threads:=1',
    )
    parser.add_argument('--json', action='store_true', help='print report.json instead of text')


def run(args: argparse.Namespace) -> int:
    from malpi_ros.bagio.replay import ReplayEvalConfig, parse_param, plot_replay

    cfg = ReplayEvalConfig(
        backend=args.backend,
        reset_each_episode=args.reset_each_episode,
        realtime=args.realtime,
        rate=args.rate,
        frame_timeout=args.frame_timeout,
        startup_timeout=args.startup_timeout,
        image_topic=args.image_topic,
        cmd_topic=args.cmd_topic,
        node_params=tuple(parse_param(p) for p in args.param),
    )
    # rclpy only from here: the CLI's --help and the ROS-free verbs must not need it.
    from malpi_ros.nodes.replay_eval_node import check_out, evaluate_offline, replay_eval
    from malpi_ros.signals import stop_on_signals

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    check_out(args.out)
    # Offline first, before any process starts: Ctrl-C here is a plain interrupt (exit 130,
    # nothing written) and a bad bag or bundle fails with the message that names it.
    evaluation = evaluate_offline(args.bundle, args.bag, cfg, log=log)
    with stop_on_signals() as stop:
        report = replay_eval(
            args.bundle, args.bag, args.out, cfg, evaluation=evaluation, stop=stop, log=log,
            progress=log,
        )  # fmt: skip
    data = report.to_dict()
    out = Path(args.out)
    with (out / REPORT_FILE).open('w') as stream:
        json.dump(data, stream, indent=1, allow_nan=False)
        stream.write('\n')
    text = report.describe()
    (out / TEXT_FILE).write_text(text + '\n')
    plot_replay(report, out / PLOT_FILE)
    print(json.dumps(data, indent=1) if args.json else text, flush=True)
    log(f'wrote {out / REPORT_FILE}, {out / TEXT_FILE}, {out / PLOT_FILE}')
    if report.interrupted:
        log('interrupted: the report covers the frames played so far')
        return 130
    return 0
