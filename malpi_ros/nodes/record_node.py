"""record_node: live topics into a rosbag2 bag (mcap), for machines without ``ros2 bag``.

Example: ``malpi-ros record --out drive_01 --topics /camera/image_raw /cmd_vel --duration 60``

On a robot with ROS installed, use ``ros2 bag record``; this recorder exists for machines that
have rclpy from pip but no rosbag2 (development, CI, replay-eval). It writes what ``ros2 bag``
writes, so either tool reads the other's bags:

- Subscriptions are ``raw=True``: rclpy hands over the CDR bytes and they are stored as they
  are, never deserialized and serialized again (cheaper, and nothing can change on the way).
- Each topic's type is discovered from the graph; topics that are not up yet are waited for
  (the graph is polled every ``discovery_period`` s) and recorded from when they appear.
- Each connection carries the message definition (``ros2msg`` text from the Kilted typestore,
  or the ``.msg`` files of an installed package such as ``malpi_ros/msg/PolicyOutput``) and the
  RIHS01 type hash the publisher announces (the typestore's where it announces none), plus the
  publishers' offered QoS profiles, as ``ros2 bag record`` stores them.
- QoS follows the publishers, as rosbag2's recorder does: reliable only when every publisher is
  reliable (a reliable subscription does not match a best-effort camera), transient-local only
  when every publisher is; deep history so a burst is not dropped before it is written.
- Receive times come from the node's clock (``use_sim_time`` is honoured).
- SIGINT, SIGTERM or ``duration`` stop it; the bag is closed in every case, so it stays valid.
- The bag survives its recorder (``malpi_ros.bagio.recording``): storage files split by duration or
  size, the open one flushed about every second, ``metadata.yaml`` listing every closed file.
  A crash loses at most what the open file received since its last flush, and ``malpi-ros
  recover`` rebuilds that file. The first write error (a full disk) stops the recording; the
  summary says so in one line and counts only what the bag's listed files hold.

``Recorder`` runs the node in a thread of its own (its own ``rclpy.Context``), for tools that
record while they do something else (replay-eval); ``record(...)`` is the blocking command.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import rclpy
from rclpy.context import Context
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.logging import get_logger
from rclpy.node import Node
from rclpy.qos import (
    ReliabilityPolicy,
)
from rclpy.signals import SignalHandlerOptions
from rclpy.utilities import remove_ros_args

from malpi_ros import diskspace
from malpi_ros.bagio.formats import check_storage
from malpi_ros.bagio.recording import FLUSH_PERIOD
from malpi_ros.bagio.writer import BagSink, Definitions, RecordSummary
from malpi_ros.errors import BagError, ConfigError
from malpi_ros.nodes.topics import announced_rihs01, message_class, subscription_qos, to_bag_qos
from malpi_ros.signals import stop_on_signals

NODE_NAME = 'record_node'


# -- the node ---------------------------------------------------------------------------------


class RecordNode(Node):
    """Subscribes (raw) to the wanted topics as they appear and writes every message to a sink."""

    def __init__(
        self,
        sink: BagSink,
        topics: Sequence[str],
        *,
        discovery_period: float = 0.1,
        context: Context | None = None,
        node_name: str = NODE_NAME,
        definitions: Definitions | None = None,
    ) -> None:
        super().__init__(node_name, context=context)
        if not topics:
            raise ConfigError('record needs at least one topic, got none')
        self._sink = sink
        self._definitions = definitions or Definitions()
        # Full names: ros2 bag and the graph speak in resolved names ('/ns/image').
        self.wanted = list(dict.fromkeys(self._resolve(t) for t in topics))
        self._recording: dict[str, Any] = {}
        self._skipped: dict[str, str] = {}  # topic -> why it cannot be recorded
        self.write_errors = 0
        self.failure = ''  # the first write error: the recording stops there
        self.failed = threading.Event()
        self._all_up = threading.Event()
        # Discovery runs in the executor's thread only, like every write (see BagSink).
        self._timer = self.create_timer(discovery_period, self.discover)
        # Flushes too: what arrived before a quiet spell must reach the disk before a crash.
        self._flush_timer = self.create_timer(FLUSH_PERIOD, self._flush)

    def _resolve(self, topic: str) -> str:
        try:
            return self.resolve_topic_name(topic)
        except RuntimeError as err:  # rclpy's RCLError
            raise ConfigError(f'not a valid topic name: {topic!r} ({err})') from err

    @property
    def subscribed(self) -> list[str]:
        return list(self._recording)

    @property
    def missing(self) -> list[str]:
        return [t for t in self.wanted if t not in self._recording]

    def wait_for_topics(self, timeout: float) -> bool:
        """Block until every wanted topic is subscribed (or skipped), at most ``timeout`` s."""
        return self._all_up.wait(timeout)

    def discover(self) -> None:
        """Subscribe to wanted topics that have appeared on the graph with a type."""
        pending = [t for t in self.wanted if t not in self._recording and t not in self._skipped]
        if pending:
            types = dict(self.get_topic_names_and_types())
            for topic in pending:
                if types.get(topic):
                    try:
                        self._subscribe(topic, types[topic])
                    except BagError as err:
                        self._skipped[topic] = str(err)
                        self.get_logger().error(f'{topic}: not recorded: {err}')
        if all(t in self._recording or t in self._skipped for t in self.wanted):
            self._all_up.set()

    def _subscribe(self, topic: str, msgtypes: list[str]) -> None:
        msgtype = msgtypes[0]
        note = ''
        if len(msgtypes) > 1:
            note = f'several types on the graph ({", ".join(msgtypes)}); recording {msgtype}'
            self.get_logger().warning(f'{topic}: {note}')
        publishers = [
            info for info in self.get_publishers_info_by_topic(topic) if info.topic_type == msgtype
        ]
        if not publishers:
            return  # only subscribers so far: wait for a publisher to learn its QoS
        offered = [info.qos_profile for info in publishers]
        msg_class = message_class(msgtype)
        msgdef, local_hash = self._definitions.definition(msgtype)
        announced = {h for h in (announced_rihs01(i.topic_type_hash) for i in publishers) if h}
        rihs01 = sorted(announced)[0] if announced else local_hash
        if announced and local_hash not in announced:
            mismatch = (
                f'publisher type hash {rihs01} differs from the local definition {local_hash}'
            )
            note = f'{note}; {mismatch}' if note else mismatch
            self.get_logger().warning(f"{topic}: {mismatch}; storing the publisher's")
        qos = subscription_qos(offered)
        reliability = (
            'reliable' if qos.reliability == ReliabilityPolicy.RELIABLE else 'best_effort'
        )
        self._sink.add_topic(
            topic, msgtype, msgdef, rihs01, [to_bag_qos(p) for p in offered], reliability, note
        )
        self._recording[topic] = self.create_subscription(
            msg_class, topic, self._writer_for(topic), qos, raw=True
        )
        self.get_logger().info(f'recording {topic} ({msgtype}, {reliability})')

    def _flush(self) -> None:
        if self.failure:
            return
        try:
            self._sink.flush()
        except Exception as err:  # a node callback: the first write error stops recording
            self._fail(err)

    def _fail(self, err: Exception) -> None:
        why = 'no room on the disk: ' if diskspace.out_of_room(err) else ''
        self.failure = f'cannot write to {self._sink.path}: {why}{err}'
        self.failed.set()

    def _writer_for(self, topic: str) -> Callable[[bytes], None]:
        sink, clock = self._sink, self.get_clock()

        def write(data: bytes) -> None:
            if self.failure:
                self.write_errors += 1
                return
            try:
                sink.write(topic, clock.now().nanoseconds, data)
            except Exception as err:  # a node callback: count, report once, stop
                # The first write error ends the recording (a full disk does not get better):
                # the bag keeps what its closed files hold, and the summary says it, once.
                self._fail(err)

        return write


class Recorder:
    """A ``RecordNode`` in a thread of its own, on a context of its own; usable as ``with``.

    ``start()`` opens the bag and starts recording; ``stop()`` stops the subscriptions and
    closes the bag (always, also after errors) and returns the summary. ``domain_id`` None
    takes ``ROS_DOMAIN_ID`` from the environment.
    """

    def __init__(
        self,
        out: str | Path,
        topics: Sequence[str],
        *,
        storage: str = 'mcap',
        domain_id: int | None = None,
        discovery_period: float = 0.1,
        node_name: str = NODE_NAME,
        ros_args: Sequence[str] | None = None,
        max_duration: float | None = None,
        max_bytes: int | None = None,
    ) -> None:
        if not topics:
            raise ConfigError('record needs at least one topic (--topics), got none')
        check_storage(storage)
        self.out = Path(out)
        self.topics = list(topics)
        self.storage = storage
        self._split = {'max_duration': max_duration, 'max_bytes': max_bytes}
        self._domain_id = domain_id
        self._discovery_period = discovery_period
        self._node_name = node_name
        self._ros_args = list(ros_args) if ros_args is not None else None
        self.node: RecordNode | None = None
        self._sink: BagSink | None = None
        self._context: Context | None = None
        self._executor: SingleThreadedExecutor | None = None
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self.summary: RecordSummary | None = None

    def start(self) -> Recorder:
        # refuses an existing --out at once
        self._sink = BagSink(self.out, self.storage, **self._split)  # type: ignore[arg-type]
        try:
            self._context = Context()
            rclpy.init(
                args=self._ros_args,
                context=self._context,
                domain_id=self._domain_id,
                signal_handler_options=SignalHandlerOptions.NO,  # the caller owns signals
            )
            self.node = RecordNode(
                self._sink,
                self.topics,
                discovery_period=self._discovery_period,
                context=self._context,
                node_name=self._node_name,
            )
            self._executor = SingleThreadedExecutor(context=self._context)
            self._executor.add_node(self.node)
            self._started = time.monotonic()
            self._thread = threading.Thread(target=self._run, name='recorder', daemon=True)
            self._thread.start()
            self._ready.wait()
            if self._failure is not None:
                raise self._failure
        except BaseException:
            self.stop()
            raise
        return self

    def _run(self) -> None:
        """The recording thread: opens the bag, spins, and closes the bag when spinning ends."""
        assert self._executor is not None and self._sink is not None and self.node is not None
        try:
            self._sink.open()
        except BagError as err:
            self._failure = err
            return
        finally:
            self._ready.set()
        try:
            self._executor.spin()
        except ExternalShutdownException:
            pass
        except Exception as err:  # reported in the summary; the bag still gets closed
            self.node.get_logger().error(f'recording stopped by an error: {err!r}')
            self._failure = err
        finally:
            try:
                self._sink.close()
            except BagError as err:
                self._failure = err

    @property
    def failed(self) -> bool:
        """True once a write failed: the recording has stopped taking messages."""
        return self.node is not None and self.node.failed.is_set()

    def wait_for_topics(self, timeout: float) -> bool:
        """True once every topic is being recorded (see ``RecordNode.wait_for_topics``)."""
        return self.node is not None and self.node.wait_for_topics(timeout)

    def counts(self) -> dict[str, int]:
        """Messages written so far, per topic (read from another thread: a snapshot)."""
        if self._sink is None:
            return {}
        return {topic: r['count'] for topic, r in list(self._sink.records.items())}

    def stop(self) -> RecordSummary:
        """Stop recording and close the bag; safe to call twice and after a failed start."""
        if self.summary is not None:
            return self.summary
        try:
            if self._executor is not None:
                self._executor.shutdown(timeout_sec=5.0)
            if self._thread is not None:
                self._thread.join(timeout=10.0)
        finally:
            # The recording thread closes the bag when its spin ends; should it hang, close it
            # here: an unclosed bag has no index and no metadata.yaml.
            if self._sink is not None and not self._sink.closed:
                try:
                    self._sink.close()
                except BagError as err:
                    self._failure = err
            if self.node is not None:
                self.node.destroy_node()
            if self._context is not None:
                rclpy.try_shutdown(context=self._context)
        missing = tuple(self.node.missing) if self.node is not None else tuple(self.topics)
        sink = self._sink
        # The first write error is the reason; closing after it fails the same way.
        error = self.node.failure if self.node is not None and self.node.failure else ''
        if not error and self._failure is not None:
            error = str(self._failure)
        self.summary = RecordSummary(
            path=self.out,
            storage=self.storage,
            duration=time.monotonic() - self._started if self._started else 0.0,
            topics=sink.topic_records() if sink is not None else (),
            missing=missing,
            write_errors=self.node.write_errors if self.node is not None else 0,
            error=error,
            unfinished=sink.unfinished if sink is not None else '',
        )
        return self.summary

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def record(
    out: str | Path,
    topics: Sequence[str],
    *,
    storage: str = 'mcap',
    duration: float | None = None,
    ros_args: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
    max_duration: float | None = None,
    max_bytes: int | None = None,
) -> RecordSummary:
    """Record until SIGINT/SIGTERM, ``duration`` seconds or the first write error; the bag is
    closed in every case. ``max_duration``/``max_bytes`` split it (``recording.SplitWriter``).

    Must run in the main thread (it installs the signal handlers, restored on return).
    """
    if duration is not None and not (duration > 0):
        raise ConfigError(f'duration must be > 0 seconds, got {duration!r}')
    recorder = Recorder(
        out,
        topics,
        storage=storage,
        ros_args=ros_args,
        max_duration=max_duration,
        max_bytes=max_bytes,
    )
    with stop_on_signals() as stop:
        try:
            recorder.start()
            if log is not None:
                log(f'recording {", ".join(recorder.topics)} into {out} ({storage}); Ctrl-C stops')
            deadline = None if duration is None else time.monotonic() + duration
            while not stop.is_set() and not recorder.failed:
                left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
                if left <= 0:
                    break
                stop.wait(left)  # short waits: signal handlers run between them
        finally:
            summary = recorder.stop()
    if log is not None and stop.signal_name:
        log(f'{stop.signal_name}: stopped')
    return summary


def main(parser: argparse.ArgumentParser, args: list[str] | None = None) -> None:
    """``record_node --out BAG --topics /a /b [--duration S] [--storage S] [--ros-args ...]``.

    ``parser`` is the ``malpi-ros record`` verb's (``commands/record.py``'s ``node_main``
    passes it), so this module never imports the CLI layer."""
    argv = list(sys.argv if args is None else ['record_node', *args])
    parsed = parser.parse_args(remove_ros_args(argv)[1:])
    try:
        summary = record(
            parsed.out,
            parsed.topics,
            storage=parsed.storage,
            duration=parsed.duration,
            max_duration=parsed.max_bag_duration,
            max_bytes=parsed.max_bag_size,
            ros_args=argv,  # rclpy.init picks out the --ros-args part itself
            log=get_logger(NODE_NAME).info,  # type: ignore[arg-type]  # returns a bool
        )
    except (BagError, ConfigError) as err:
        get_logger(NODE_NAME).fatal(str(err))
        sys.exit(2)
    print(summary.describe())
    if summary.error:
        sys.exit(1)
