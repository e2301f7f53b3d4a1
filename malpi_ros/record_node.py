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
- The bag survives its recorder (``malpi_ros.recording``): storage files split by duration or
  size, the open one flushed about every second, ``metadata.yaml`` listing every closed file.
  A crash loses at most what the open file received since its last flush, and ``malpi-ros
  recover`` rebuilds that file. The first write error (a full disk) stops the recording; the
  summary says so in one line and counts only what the bag's listed files hold.

``Recorder`` runs the node in a thread of its own (its own ``rclpy.Context``), for tools that
record while they do something else (replay-eval); ``record(...)`` is the blocking command.
"""

from __future__ import annotations

import importlib
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rclpy
from rclpy.context import Context
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.logging import get_logger
from rclpy.node import Node
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
)
from rclpy.signals import SignalHandlerOptions
from rclpy.utilities import remove_ros_args
from rosbags.interfaces import (
    Qos,
    QosDurability,
    QosHistory,
    QosLiveliness,
    QosReliability,
    QosTime,
)
from rosbags.rosbag2 import WriterError
from rosbags.typesys import Stores, TypesysError, get_types_from_msg, get_typestore
from rosbags.typesys.base import Nodetype

from malpi_ros import diskspace
from malpi_ros.errors import BagError, ConfigError
from malpi_ros.recording import FLUSH_PERIOD, STORAGES, SplitWriter, Topic
from malpi_ros.signals import stop_on_signals

NODE_NAME = 'record_node'
DEPTH = 100  # subscription history: room for a burst while the writer is busy
_INFINITE_NS = 2**63 - 1  # rmw's "infinite" duration
_INFINITE_QOS_TIME = QosTime(2147483647, 4294967295)  # how rosbag2 writes it


# -- what goes into the bag besides the bytes ---------------------------------------------------


class Definitions:
    """Message definitions and RIHS01 hashes for bag connections, by type name.

    Types of the Kilted typestore are known at once; others (our ``malpi_ros/msg/...``, or any
    installed package's) are read from ``<prefix>/share/<pkg>/msg/<Name>.msg`` the first time
    they are asked for, with the types they use, and added to the store.
    """

    def __init__(self, search: Sequence[Path] = ()) -> None:
        self.store = get_typestore(getattr(Stores, 'ROS2_KILTED', Stores.LATEST))
        self._search = list(search)

    def definition(self, msgtype: str) -> tuple[str, str]:
        """(msgdef text, RIHS01 hash) of ``msgtype``; BagError when it cannot be found."""
        self._ensure(msgtype, [])
        try:
            msgdef, _ = self.store.generate_msgdef(msgtype, ros_version=2)
            return msgdef, self.store.hash_rihs01(msgtype)
        except (TypesysError, KeyError) as err:
            raise BagError(f'no usable message definition of {msgtype}: {err}') from err

    def _ensure(self, msgtype: str, chain: list[str]) -> None:
        if msgtype in self.store.fielddefs or msgtype in chain:
            return
        text = self._msg_file(msgtype).read_text()
        try:
            types = get_types_from_msg(text, msgtype)
        except TypesysError as err:
            raise BagError(f'cannot parse the definition of {msgtype}: {err}') from err
        for _, fields in types.values():
            for _, (kind, detail) in fields:
                for nested in _nested_names(kind, detail):
                    self._ensure(nested, [*chain, msgtype])
        self.store.register(types)

    def _msg_file(self, msgtype: str) -> Path:
        package, kind, name = _split_type(msgtype)
        candidates = []
        for prefix in self._prefixes(package):
            candidates.append(prefix / 'share' / package / kind / f'{name}.{kind}')
        for path in candidates:
            if path.is_file():
                return path
        raise BagError(
            f'no definition of {msgtype}: not in the Kilted typestore and none of '
            f'{", ".join(str(p) for p in candidates) or "(no install prefix found)"} exists'
        )

    def _prefixes(self, package: str) -> list[Path]:
        prefixes = [Path(p) for p in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep)]
        prefixes += [*self._search, Path(sys.prefix)]
        # The prefix a package's Python code is installed under: <prefix>/lib/pythonX.Y/...
        with suppress(ImportError, AttributeError, TypeError):
            module = importlib.import_module(package)
            for location in getattr(module, '__path__', []):
                parts = Path(location).resolve().parts
                if 'lib' in parts:
                    prefixes.append(Path(*parts[: len(parts) - parts[::-1].index('lib') - 1]))
        return [p for p in dict.fromkeys(prefixes) if str(p) not in ('', '.')]


def _nested_names(kind: Any, detail: Any) -> list[str]:
    if kind == Nodetype.NAME:
        return [detail]
    if kind in (Nodetype.ARRAY, Nodetype.SEQUENCE):
        return _nested_names(*detail[0])
    return []


def _split_type(msgtype: str) -> tuple[str, str, str]:
    parts = msgtype.split('/')
    if len(parts) != 3 or not all(parts):
        raise BagError(f'not a ROS 2 type name (pkg/msg/Name): {msgtype!r}')
    return parts[0], parts[1], parts[2]


def message_class(msgtype: str) -> type:
    """The rclpy message class of ``pkg/msg/Name`` (needed for type support, even when raw)."""
    package, kind, name = _split_type(msgtype)
    try:
        return getattr(importlib.import_module(f'{package}.{kind}'), name)
    except (ImportError, AttributeError) as err:
        raise BagError(
            f'cannot subscribe to {msgtype}: its Python package is missing: {err}'
        ) from err


def _qos_time(duration: Any) -> QosTime:
    ns = int(getattr(duration, 'nanoseconds', duration))
    if ns >= _INFINITE_NS or ns < 0:
        return _INFINITE_QOS_TIME
    return QosTime(ns // 1_000_000_000, ns % 1_000_000_000)


def _enum(cls: Any, policy: Any, default: Any) -> Any:
    try:
        return cls(int(policy))
    except ValueError:
        return default


def to_bag_qos(profile: QoSProfile) -> Qos:
    """An rclpy QoS profile as rosbags writes it into the bag's metadata."""
    return Qos(
        history=_enum(QosHistory, profile.history, QosHistory.UNKNOWN),
        depth=int(profile.depth),
        reliability=_enum(QosReliability, profile.reliability, QosReliability.UNKNOWN),
        durability=_enum(QosDurability, profile.durability, QosDurability.UNKNOWN),
        deadline=_qos_time(profile.deadline),
        lifespan=_qos_time(profile.lifespan),
        liveliness=_enum(QosLiveliness, profile.liveliness, QosLiveliness.UNKNOWN),
        liveliness_lease_duration=_qos_time(profile.liveliness_lease_duration),
        avoid_ros_namespace_conventions=bool(profile.avoid_ros_namespace_conventions),
    )


def subscription_qos(offered: Sequence[QoSProfile]) -> QoSProfile:
    """The QoS that receives from every publisher: reliable/transient-local only if all are."""
    reliable = bool(offered) and all(p.reliability == ReliabilityPolicy.RELIABLE for p in offered)
    latched = bool(offered) and all(
        p.durability == DurabilityPolicy.TRANSIENT_LOCAL for p in offered
    )
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=DEPTH,
        reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE,
    )


def _rihs01(type_hash: Any) -> str | None:
    """'RIHS01_<hex>' of an rclpy TypeHash, or None when the publisher announced none."""
    if type_hash is None or getattr(type_hash, 'version', -1) != 1:
        return None
    value = bytes(type_hash.value)
    return f'RIHS01_{value.hex()}' if any(value) else None


# -- the bag ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopicRecord:
    """One recorded topic: its type, the hash stored, and how many messages were written."""

    topic: str
    msgtype: str
    rihs01: str
    count: int
    qos: str  # 'reliable' or 'best_effort': what the subscription used
    note: str = ''  # e.g. a type hash that differs from the local definition


@dataclass(frozen=True)
class RecordSummary:
    """What a recording holds when it is closed."""

    path: Path
    storage: str
    duration: float  # s from start to stop
    topics: tuple[TopicRecord, ...]
    missing: tuple[str, ...]  # asked for, never seen on the graph
    write_errors: int  # messages not recorded after the recording failed
    error: str = ''  # why the recording stopped early, if it did
    unfinished: str = ''  # the last file, when it could not be finished (recover rebuilds it)

    @property
    def messages(self) -> int:
        return sum(t.count for t in self.topics)

    def describe(self) -> str:
        lines = [
            f'{self.path}: {self.messages} messages on {len(self.topics)} topics in '
            f'{self.duration:.1f} s ({self.storage})'
        ]
        for t in self.topics:
            note = f'  [{t.note}]' if t.note else ''
            lines.append(f'  {t.topic}: {t.msgtype} x{t.count} ({t.qos}){note}')
        for topic in self.missing:
            lines.append(f'  {topic}: never published while recording (not in the bag)')
        if self.error:  # one line: why, what was lost, what to do
            lost = (
                f'; {self.write_errors} later messages not recorded' if self.write_errors else ''
            )
            rest = (
                f'; {self.unfinished} is unfinished: `malpi-ros recover {self.path}` rebuilds '
                'it once there is room'
                if self.unfinished
                else ''
            )
            lines.append(
                f'  recording stopped early: {self.error}{lost}; the bag holds what is listed '
                f'above{rest}'
            )
        return '\n'.join(lines)


class BagSink:
    """Where the node's messages go: a ``recording.SplitWriter`` (split, flushed as it goes),
    plus what was written per topic. Closed exactly once.

    One thread opens, writes and closes it (the executor's thread in ``Recorder``): the
    sqlite3 storage refuses a connection used from another thread than the one that made it.
    """

    def __init__(
        self,
        path: str | Path,
        storage: str = 'mcap',
        *,
        max_duration: float | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.storage = storage
        if self.path.exists():
            raise BagError(f'output bag {self.path} exists already; not overwriting it')
        self._writer = SplitWriter(
            self.path, storage, max_duration=max_duration, max_bytes=max_bytes
        )
        self.records: dict[str, dict[str, Any]] = {}
        self.opened = False
        self.closed = False

    def open(self) -> None:
        self._writer.open()
        self.opened = True

    def add_topic(
        self,
        topic: str,
        msgtype: str,
        msgdef: str,
        rihs01: str,
        offered: Sequence[Qos],
        qos: str,
        note: str = '',
    ) -> None:
        self._writer.add_topic(Topic(topic, msgtype, msgdef, rihs01, tuple(offered)))
        self.records[topic] = {
            'msgtype': msgtype,
            'rihs01': rihs01,
            'count': 0,
            'qos': qos,
            'note': note,
        }

    def write(self, topic: str, t_ns: int, data: bytes) -> None:
        self._writer.write(topic, t_ns, data)
        self.records[topic]['count'] += 1

    def flush(self) -> None:
        if self.opened and not self.closed:
            self._writer.flush()

    def close(self) -> None:
        """Close the open split and list it in metadata.yaml (the closed ones already are)."""
        if self.opened and not self.closed:
            self.closed = True
            try:
                self._writer.close()
            except (WriterError, OSError, sqlite3.Error) as err:
                raise BagError(f'bag {self.path}: error while closing: {err}') from err

    @property
    def unfinished(self) -> str:
        """The split a failed close left in its .open directory ('' when none)."""
        return self._writer.unfinished

    def topic_records(self) -> tuple[TopicRecord, ...]:
        """What a reader of the bag finds: the messages of the listed (closed) files."""
        readable = self._writer.closed_counts
        return tuple(
            TopicRecord(topic, **{**fields, 'count': readable.get(topic, 0)})
            for topic, fields in self.records.items()
        )


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
        announced = {h for h in (_rihs01(i.topic_type_hash) for i in publishers) if h}
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
        if storage not in STORAGES:
            raise ConfigError(f'storage must be one of {", ".join(STORAGES)}, got {storage!r}')
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
        self._sink = BagSink(self.out, self.storage, **self._split)
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


def main(args: list[str] | None = None) -> None:
    """``record_node --out BAG --topics /a /b [--duration S] [--storage S] [--ros-args ...]``."""
    from malpi_ros.commands import record as command

    argv = list(sys.argv if args is None else ['record_node', *args])
    parsed = command.build_parser('record_node').parse_args(remove_ros_args(argv)[1:])
    try:
        summary = record(
            parsed.out,
            parsed.topics,
            storage=parsed.storage,
            duration=parsed.duration,
            max_duration=parsed.max_bag_duration,
            max_bytes=parsed.max_bag_size,
            ros_args=argv,  # rclpy.init picks out the --ros-args part itself
            log=get_logger(NODE_NAME).info,
        )
    except (BagError, ConfigError) as err:
        get_logger(NODE_NAME).fatal(str(err))
        sys.exit(2)
    print(summary.describe())
    if summary.error:
        sys.exit(1)


if __name__ == '__main__':
    main()
