"""malpi-ros recover drive_01/

Rebuild a recording that its recorder did not finish — killed (SIGKILL, power cut), stopped by
a full disk, or with the end of a storage file cut off — from the messages that are on disk.
Every unfinished storage file of the bag (the open split of `malpi-ros record`, a listed mcap
without its summary, a storage file that metadata.yaml lacks) is read up to its first broken
record, written again as a complete file and listed in metadata.yaml; the bag then opens in
`malpi-ros inspect`, `train`, `ros2 bag play` and `rosbags`. Finished files are left as they
are. Prints what was rebuilt; exits 1 when the bag cannot be read or written.

A recording of `malpi-ros record` loses to a crash at most what arrived since the last flush of
its open file (about a second); an mcap of another recorder keeps what its writer had flushed.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('bag', type=Path, metavar='BAG', help='rosbag2 directory to repair')


def run(args: argparse.Namespace) -> int:
    from malpi_ros.bagio import recording

    print(recording.describe(recording.recover(args.bag)), flush=True)
    return 0
