"""The one rosbag2 writer (``rosbags`` only, no rclpy): message definitions, sinks.

``BagWriter`` writes a bag in one go (the simulator's expert recorder, the tests' bag factory);
``BagSink`` writes a live recording through ``recording.SplitWriter`` (split, flushed as it
goes, recoverable) and counts what each topic received (the recorder node, with raw CDR bytes
from rclpy). Both take the storages and the typestore from ``formats``. ``Definitions`` finds a
type in the Kilted typestore or in an installed package's ``share/<pkg>/msg``.
"""

from __future__ import annotations

import importlib
import os
import sqlite3
import sys
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rosbags.interfaces import Qos
from rosbags.rosbag2 import Writer, WriterError
from rosbags.typesys import TypesysError, get_types_from_msg
from rosbags.typesys.base import Nodetype

from malpi_ros.bagio.formats import check_storage, typestore
from malpi_ros.bagio.recording import SplitWriter, Topic
from malpi_ros.errors import BagError


class Definitions:
    """Message definitions and RIHS01 hashes for bag connections, by type name.

    Types of the Kilted typestore are known at once; others (our ``malpi_ros/msg/...``, or any
    installed package's) are read from ``<prefix>/share/<pkg>/msg/<Name>.msg`` the first time
    they are asked for, with the types they use, and added to the store.
    """

    def __init__(self, search: Sequence[Path] = ()) -> None:
        self.store = typestore()
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
                for nested in nested_names(kind, detail):
                    self._ensure(nested, [*chain, msgtype])
        self.store.register(types)

    def _msg_file(self, msgtype: str) -> Path:
        package, kind, name = split_type(msgtype)
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


def nested_names(kind: Any, detail: Any) -> list[str]:
    if kind == Nodetype.NAME:
        return [detail]
    if kind in (Nodetype.ARRAY, Nodetype.SEQUENCE):
        return nested_names(*detail[0])
    return []


def split_type(msgtype: str) -> tuple[str, str, str]:
    parts = msgtype.split('/')
    if len(parts) != 3 or not all(parts):
        raise BagError(f'not a ROS 2 type name (pkg/msg/Name): {msgtype!r}')
    return parts[0], parts[1], parts[2]


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


class BagWriter:
    """A bag written in one go: topics by name, messages as rosbags objects or CDR bytes.

    ``with BagWriter(path, 'mcap') as bag: bag.add_topic(topic, msgtype); bag.write(...)``.
    ``store``: the typestore the messages were built with (default: a new ``typestore()``).
    """

    def __init__(self, path: str | Path, storage: str = 'mcap', *, store: Any = None) -> None:
        self.path = Path(path)
        self.store = typestore() if store is None else store
        self._writer = Writer(self.path, version=9, storage_plugin=check_storage(storage))
        self._topics: dict[str, tuple[Any, str]] = {}  # topic -> (connection, msgtype)

    def open(self) -> BagWriter:
        self._writer.open()
        return self

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> BagWriter:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_topic(self, topic: str, msgtype: str) -> None:
        """Declare a topic (again: no-op), so a topic with no messages is in the bag too."""
        if topic not in self._topics:
            connection = self._writer.add_connection(topic, msgtype, typestore=self.store)
            self._topics[topic] = (connection, msgtype)

    def write(self, topic: str, t_ns: int, message: Any) -> None:
        """One message received at ``t_ns``: CDR ``bytes`` as they are, else serialized."""
        connection, msgtype = self._topics[topic]
        if not isinstance(message, bytes | bytearray | memoryview):
            message = self.store.serialize_cdr(message, msgtype)
        self._writer.write(connection, t_ns, bytes(message))
