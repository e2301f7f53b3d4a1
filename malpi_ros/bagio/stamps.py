"""The latency stamps of a recorded run: ``policy_node``'s ``~/output`` and the driver's
``~/applied``, read from a rosbag2 recording for ``malpi-ros latency`` (``runtime.latency``).

Both topics are found by type (``PolicyOutput``, ``AppliedCommand``) unless named. Outputs a
teleop overrode are left out (their command was not the one the motors got), as are applied
commands of a source other than the policy. A bag without either topic, or recorded before
the stamps existed (all zero), is a ``BagError`` naming the bag and the topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from malpi_ros.bagio.reader import APPLIED_TYPE, Bag, open_bag, pick_topic
from malpi_ros.errors import BagError
from malpi_ros.runtime.latency import Applied, LatencyReport, PolicyStamps, report
from malpi_ros.runtime.latency import stamp_ns as _ns

OUTPUT_TYPE = 'malpi_ros/msg/PolicyOutput'
POLICY_SOURCE = 1  # AppliedCommand.SOURCE_POLICY


@dataclass(frozen=True)
class RunStamps:
    """What a recording holds for the latency report, and where it came from."""

    bag: str
    output_topic: str
    applied_topic: str
    outputs: tuple[PolicyStamps, ...]
    applied: tuple[Applied, ...]
    overridden: int  # outputs left out: a takeover drove

    def report(self) -> LatencyReport:
        return report(self.outputs, self.applied)


def _outputs(bag: Bag, topic: str) -> tuple[list[PolicyStamps], int]:
    outputs, overridden, unstamped = [], 0, 0
    for _, msg in bag.messages(topic):
        if not hasattr(msg, 'received') or not _ns(msg.received):
            unstamped += 1
            continue
        if msg.overridden:
            overridden += 1
            continue
        try:
            outputs.append(
                PolicyStamps(
                    frame=_ns(msg.header.stamp),
                    received=_ns(msg.received),
                    preprocessed=_ns(msg.preprocessed),
                    stepped=_ns(msg.stepped),
                    published=_ns(msg.published),
                ).check()
            )
        except ValueError as err:
            raise BagError(f'bag {bag.name}, topic {topic}: bad stage stamps: {err}') from err
    if not outputs and unstamped:
        raise BagError(
            f'bag {bag.name}, topic {topic}: {unstamped} outputs without stage stamps (recorded '
            'by a policy_node older than the stamps); record a run with this version'
        )
    return outputs, overridden


def _applied(bag: Bag, topic: str) -> list[Applied]:
    out = []
    for _, msg in bag.messages(topic):
        if not hasattr(msg, 'command_stamp'):
            raise BagError(
                f'bag {bag.name}, topic {topic}: AppliedCommand without command_stamp (recorded '
                'by a motor_driver_node older than the stamps); record a run with this version'
            )
        if msg.source == POLICY_SOURCE and _ns(msg.command_stamp):
            out.append(Applied(_ns(msg.command_stamp), _ns(msg.applied_stamp)))
    return out


def read_stamps(
    path: str | Path, output_topic: str | None = None, applied_topic: str | None = None
) -> RunStamps:
    """The stamps of a recorded run (topics by type unless named); BagError naming the bag and
    the topic when one is missing, empty, ambiguous or without stamps."""
    with open_bag(path) as bag:
        output, _ = pick_topic(
            bag, output_topic, {OUTPUT_TYPE: 'output'}, "policy_node's ~/output", '--output-topic'
        )
        applied, _ = pick_topic(
            bag,
            applied_topic,
            {APPLIED_TYPE: 'applied'},
            "motor_driver_node's ~/applied",
            '--applied-topic',
        )
        outputs, overridden = _outputs(bag, output)
        applied_cmds = _applied(bag, applied)
    if not outputs:
        raise BagError(
            f'bag {bag.name}, topic {output}: every output was overridden by a takeover: '
            'nothing the policy drove'
        )
    return RunStamps(
        bag=bag.name,
        output_topic=output,
        applied_topic=applied,
        outputs=tuple(outputs),
        applied=tuple(applied_cmds),
        overridden=overridden,
    )
