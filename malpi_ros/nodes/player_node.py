"""player_node: publish a rosbag2 recording on the live graph, for machines without ``ros2 bag``.

Example: ``malpi-ros play drive_01 --rate 2 --remap /camera/image_raw:=/image``

On a robot with ROS installed, ``ros2 bag play`` is the tool. This player exists for machines
with rclpy from pip but no rosbag2 (a training workstation, CI, replay-eval):

- It publishes the stored CDR bytes as they are (``Publisher.publish(bytes)``): nothing is
  deserialized and serialized again, so subscribers see exactly what was recorded.
- Timing follows the bag's receive times, scaled by ``--rate`` (``bagio.replay.schedule``),
  against a monotonic clock: a message that falls behind is sent at once, never dropped, and the
  next ones keep their schedule (the worst lag is reported).
- QoS: images best effort (sensor data), everything else reliable (``replay.choose_qos`` says
  why).
- Before the first message it waits (``--wait-for-subscribers``, default 1 s) until every topic
  has a subscriber, then a short settle time (and ``--delay``) so the subscriber's side of the
  match is done too: a subscriber drops samples of a publisher it has not matched yet. Seen
  here on a loaded machine: discovery taking over a second, and the first frames lost with no
  settle time. After the last message it waits for reliable subscribers' acknowledgements and
  lingers briefly before leaving the graph (seen: else the last frame could be lost).
- SIGINT/SIGTERM stop it between two messages; it then exits 0 (Ctrl-C is how a ``--loop``
  playback ends) after printing what it published.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import rclpy
from rclpy.context import Context
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.publisher import Publisher
from rclpy.signals import SignalHandlerOptions

from malpi_ros.bagio.reader import Bag, describe_topics, open_bag
from malpi_ros.bagio.replay import (
    PlayConfig,
    PlayStats,
    Throttle,
    TopicQos,
    choose_qos,
    progress_line,
    schedule,
)
from malpi_ros.errors import BagError, ConfigError, MalpiError
from malpi_ros.nodes.topics import SETTLE, message_class, qos_profile, wait_until

NODE_NAME = 'player_node'
LINGER = 0.2  # s after the last message before leaving the graph (seen: else the last was lost)
ACK_TIMEOUT = 1.0  # s to wait for reliable subscribers to acknowledge the last messages
POLL = 0.02  # s between graph checks while waiting for subscribers


class PlayerNode(Node):
    """One publisher per replayed topic; publishes raw CDR bytes under the remapped name."""

    def __init__(
        self,
        topics: Mapping[str, tuple[str, TopicQos]],
        cfg: PlayConfig,
        *,
        context: Context | None = None,
        node_name: str = NODE_NAME,
    ) -> None:
        super().__init__(node_name, context=context)
        self.publishers_by_topic: dict[str, Publisher] = {}
        targets: dict[str, str] = {}
        for topic, (msgtype, qos) in topics.items():
            target = cfg.target(topic)
            if target in targets and targets[target] != msgtype:
                raise ConfigError(
                    f'remap sends {topic} ({msgtype}) to {target}, which already carries '
                    f'{targets[target]}'
                )
            targets[target] = msgtype
            self.publishers_by_topic[topic] = self.create_publisher(
                message_class(msgtype), target, qos_profile(qos)
            )
            self.get_logger().debug(f'{topic} -> {target} ({msgtype}, {qos.describe})')

    def unmatched(self) -> list[str]:
        """Topics (bag names) whose publisher has no subscriber yet."""
        return [
            t for t, pub in self.publishers_by_topic.items() if pub.get_subscription_count() == 0
        ]

    def wait_for_subscribers(
        self, timeout: float, stop: threading.Event, clock: Callable[[], float] = time.monotonic
    ) -> list[str]:
        """Wait up to ``timeout`` s until every topic has a subscriber; the ones still without.

        When some were waited for and matched, sleep ``SETTLE`` s more: the publisher learns
        of a subscriber before the subscriber has matched the publisher, and a subscriber
        drops samples from a writer it has not matched yet.
        """
        if timeout <= 0:
            return self.unmatched()
        deadline = clock() + timeout
        waiting = self.unmatched()
        while waiting and clock() < deadline and not stop.wait(POLL):
            waiting = self.unmatched()
        if len(waiting) < len(self.publishers_by_topic):
            stop.wait(SETTLE)
        return waiting

    def publish(self, topic: str, data: bytes) -> None:
        self.publishers_by_topic[topic].publish(data)

    def flush(self, reliable: Sequence[str]) -> None:
        """Before leaving the graph: reliable topics until acknowledged (at most ACK_TIMEOUT),
        then LINGER for best-effort ones. A subscriber that sees the publisher leave may drop
        a sample it has not taken yet."""
        for topic in reliable:
            self.publishers_by_topic[topic].wait_for_all_acked(Duration(seconds=ACK_TIMEOUT))
        time.sleep(LINGER)


def topics_to_play(bag: Bag, cfg: PlayConfig) -> dict[str, tuple[str, TopicQos]]:
    """topic -> (type, QoS) of the topics to publish; BagError lists what the bag has."""
    available = bag.topics
    wanted = list(cfg.topics) if cfg.topics is not None else sorted(available)
    unknown = [t for t in wanted if t not in available]
    if unknown:
        raise BagError(
            f'bag {bag.name}: no topic {", ".join(unknown)}; it has: {describe_topics(available)}'
        )
    offered: dict[str, list[Any]] = {}
    for conn in bag.reader.connections:
        ext = getattr(conn, 'ext', None)
        offered.setdefault(conn.topic, []).extend(getattr(ext, 'offered_qos_profiles', None) or [])
    chosen = {}
    for topic in wanted:
        msgtype = available[topic][0]
        try:
            message_class(msgtype)
        except BagError as err:
            raise BagError(f'bag {bag.name}, topic {topic}: {err}') from err
        chosen[topic] = (msgtype, choose_qos(msgtype, offered.get(topic)))
    return chosen


def play(
    bag_path: str | Path,
    cfg: PlayConfig,
    *,
    stop: threading.Event | None = None,
    log: Callable[[str], None] | None = None,
    progress: Callable[[str], None] | None = None,
    progress_period: float = 0.5,
    domain_id: int | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> PlayStats:
    """Publish ``bag_path`` on the graph of ``ROS_DOMAIN_ID`` (or ``domain_id``) until its end
    (or ``stop`` is set); returns what was published. Runs in the caller's thread."""
    stop = stop if stop is not None else threading.Event()
    stats = PlayStats()
    with open_bag(bag_path) as bag:
        topics = topics_to_play(bag, cfg)
        start_ns = bag.reader.start_time if bag.reader.message_count else 0
        duration = bag.reader.duration * 1e-9 if bag.reader.message_count else 0.0
        if cfg.start > duration:
            raise ConfigError(
                f'start {cfg.start} s is past the end of {bag.name} ({duration:.3f} s)'
            )
        context = Context()
        rclpy.init(
            args=[],  # not sys.argv: rcl would take a --remap value 'a:=b' for a remap rule
            context=context,
            domain_id=domain_id,
            signal_handler_options=SignalHandlerOptions.NO,  # the caller owns the signals
        )
        node: PlayerNode | None = None
        try:
            node = PlayerNode(topics, cfg, context=context)
            if log is not None:
                for topic, (msgtype, qos) in topics.items():
                    target = cfg.target(topic)
                    renamed = f' as {target}' if target != topic else ''
                    log(f'playing {topic}{renamed} ({msgtype}, {qos.describe})')
            stats.unmatched = tuple(node.wait_for_subscribers(cfg.wait_for_subscribers, stop))
            if cfg.delay:
                stop.wait(cfg.delay)
            throttle = Throttle(progress_period)
            names = list(topics)
            t0 = clock()
            for item in schedule(lambda: bag.raw_messages(names), start_ns, cfg):
                due = t0 + item.due
                if not wait_until(due, stop, clock):
                    stats.interrupted = True
                    break
                node.publish(item.topic, item.data)
                now = clock()
                stats.late_max = max(stats.late_max, now - due)
                stats.count(item.topic)
                stats.bag_time, stats.loops = item.bag_time, item.loop
                if progress is not None and throttle.ready(now):
                    progress(progress_line(item.bag_time, duration, stats.total, item.loop))
            else:
                stats.interrupted = stop.is_set()
            stats.wall = clock() - t0
            if stats.total and not stats.interrupted:
                node.flush([t for t, (_, qos) in topics.items() if qos.reliable])
        finally:
            if node is not None:
                with suppress(Exception):
                    node.destroy_node()
            rclpy.try_shutdown(context=context)
    return stats


def main(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], int],
    args: list[str] | None = None,
) -> None:
    """``player_node BAG [play options]``: the ``malpi-ros play`` verb as a node executable.

    The verb's ``parser`` and ``run`` come from ``commands/play.py`` (``node_main``), so this
    module never imports the CLI layer."""
    argv = sys.argv[1:] if args is None else list(args)
    try:
        sys.exit(run(parser.parse_args(argv)))
    except MalpiError as err:
        print(f'player_node: error: {err}', file=sys.stderr)
        sys.exit(1)
