"""Reading rosbag2 recordings (mcap or sqlite3) with ``rosbags``: topics, stamps, messages.

Pure Python, no ROS install needed, so training and inspection run anywhere. Every error that
``rosbags`` (or the storage underneath it) raises is translated here into a ``BagError`` that
names the bag, and the topic when reading one topic failed.

Which clock: a message carries two times, the bag's *receive* time (when the recorder got it,
one clock for every topic) and, for stamped types, its header stamp (the sender's clock, e.g.
the camera driver's). They can differ wildly (a camera on its own clock, a sim publishing sim
time, stamps left at zero), and ``Twist`` has no header at all. So this package aligns frames
with commands on the receive time of BOTH topics, always. Header stamps are read only as a
second opinion on the frame period (their spacing is free of transport jitter) and to report
how far the sender's clock is from the recorder's. ``stamp='header'`` in ``Bag.messages`` gives
the header stamp where it is non-zero (receive time otherwise) for callers that want it.
"""

from __future__ import annotations

import hashlib
import sqlite3
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from rosbags.highlevel import AnyReader, AnyReaderError
from rosbags.rosbag2 import ReaderError
from rosbags.serde import SerdeError
from rosbags.typesys import TypesysError

from malpi_ros.bagio.formats import typestore
from malpi_ros.errors import BagError

try:  # what rosbags decompresses zstd chunks with
    from compression.zstd import ZstdError  # type: ignore[import-not-found]
except ImportError:
    from backports.zstd import ZstdError

IMAGE_TYPES = {
    'sensor_msgs/msg/Image': 'raw',
    'sensor_msgs/msg/CompressedImage': 'compressed',
}
# What frames are labelled from. ``applied`` (motor_driver_node's ~/applied) is what the motors
# actually got, with its source: when a bag has it, it is the command topic (find_topics).
APPLIED_TYPE = 'malpi_ros/msg/AppliedCommand'
CMD_TYPES = {
    'geometry_msgs/msg/Twist': 'twist',
    'geometry_msgs/msg/TwistStamped': 'twist_stamped',
    APPLIED_TYPE: 'applied',
}
# AppliedCommand.source codes (malpi_ros.runtime.takeover.SOURCES); a Twist has none.
UNKNOWN_SOURCE = -1
TELEOP_SOURCE = 2
STAMPS = ('receive', 'header')
STORAGE_SUFFIXES = ('.mcap', '.db3')

# What rosbags and the storage below it raise on missing, truncated or corrupt input. Caught
# only around calls into rosbags and re-raised as BagError with the bag's name (``from err``).
_READ_ERRORS: tuple[type[BaseException], ...] = (
    AnyReaderError,
    ReaderError,
    SerdeError,
    TypesysError,
    OSError,
    sqlite3.Error,
    struct.error,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    AssertionError,
    RuntimeError,  # lz4 on a corrupt mcap chunk
    OverflowError,  # sizes read from corrupt records
    ZstdError,  # zstd on a corrupt chunk or file
)


def _seconds(nanoseconds: int) -> float:
    return nanoseconds * 1e-9


def header_stamp(msg: Any) -> float | None:
    """A message's header stamp in seconds, or None when it has no header or the stamp is 0."""
    header = getattr(msg, 'header', None)
    if header is None:
        return None
    stamp = header.stamp
    if stamp.sec == 0 and stamp.nanosec == 0:
        return None
    return stamp.sec + stamp.nanosec * 1e-9


def twist_of(msg: Any) -> tuple[float, float]:
    """(linear.x, angular.z) of a Twist, TwistStamped or AppliedCommand; NaN passed through."""
    if hasattr(msg, 'linear_x'):  # AppliedCommand
        return float(msg.linear_x), float(msg.angular_z)
    twist = msg.twist if hasattr(msg, 'twist') else msg
    return float(twist.linear.x), float(twist.angular.z)


def command_of(msg: Any) -> tuple[float, float, int]:
    """(linear.x, angular.z, source) of a command message: the AppliedCommand's source
    (stop 0, policy 1, teleop 2), UNKNOWN_SOURCE for a Twist."""
    source = int(msg.source) if hasattr(msg, 'linear_x') else UNKNOWN_SOURCE
    return (*twist_of(msg), source)


class Bag:
    """An open recording: its topics, and its messages in receive-time order.

    Use ``open_bag(path)`` (a context manager). Messages come in the bag's receive-time order
    (the order rosbag2 stores and indexes them).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        if not self.path.exists():
            raise BagError(f'bag {self.name}: no such file or directory')
        if self.path.is_dir() and not (self.path / 'metadata.yaml').exists():
            storages = sorted(p.name for p in self.path.iterdir() if p.suffix in STORAGE_SUFFIXES)
            hint = f'; give one of its storage files instead: {storages}' if storages else ''
            if storages or any(p.name.endswith('.open') for p in self.path.iterdir()):
                hint += f'; if its recorder did not finish, `malpi-ros recover {self.name}`'
            raise BagError(f'bag {self.name}: not a rosbag2 directory (no metadata.yaml){hint}')
        if self.path.is_file() and _is_ros1_bag(self.path):
            raise BagError(
                f'bag {self.name}: a ROS 1 bag; malpi_ros reads rosbag2 (ROS 2) recordings: '
                f'convert it with `rosbags-convert --src {self.name} --dst '
                f'{self.path.with_suffix("")}` (installed with rosbags)'
            )
        if self.path.is_file() and self.path.suffix not in STORAGE_SUFFIXES:
            raise BagError(
                f'bag {self.name}: unknown storage {self.path.suffix!r}; expected a rosbag2 '
                f'directory or a {" or ".join(STORAGE_SUFFIXES)} file'
            )
        self._reader: AnyReader | None = None
        self._types: dict[str, str] = {}

    # -- opening and closing ---------------------------------------------------------------

    def open(self) -> Bag:
        default = typestore()
        try:
            reader = AnyReader([_reader_path(self.path)], default_typestore=default)
            reader.open()
        except _READ_ERRORS as err:
            hint = (
                f'; `malpi-ros recover {self.name}` rebuilds a cut or unfinished recording'
                if self.path.is_dir()
                else ''
            )
            raise BagError(f'bag {self.name}: cannot open: {err}{hint}') from err
        # Bags carry their message definitions; types a bag lacks (older sqlite3 bags) come
        # from the default store so they can still be deserialized. Only then: registering
        # the whole store costs ~50 ms per open.
        known = reader.typestore.fielddefs
        if any(c.msgtype not in known for c in reader.connections):
            missing = {n: f for n, f in default.fielddefs.items() if n not in known}
            try:
                reader.typestore.register(missing)
            except TypesysError as err:  # pragma: no cover - conflicting definitions
                reader.close()
                raise BagError(
                    f'bag {self.name}: inconsistent message definitions: {err}'
                ) from err
        self._reader = reader
        self._types = {c.topic: c.msgtype for c in reader.connections}
        return self

    def close(self) -> None:
        if self._reader is not None:
            reader, self._reader = self._reader, None
            try:
                reader.close()
            except _READ_ERRORS as err:  # pragma: no cover - closing a corrupt file
                raise BagError(f'bag {self.name}: error while closing: {err}') from err

    def __enter__(self) -> Bag:
        return self if self._reader is not None else self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def reader(self) -> AnyReader:
        if self._reader is None:
            raise BagError(f'bag {self.name}: not open')
        return self._reader

    # -- what is in it ---------------------------------------------------------------------

    @property
    def storage(self) -> str:
        """'mcap' or 'sqlite3', from the storage file's suffix."""
        files = storage_files(self.path)
        return 'mcap' if files and '.mcap' in files[0].suffixes else 'sqlite3'

    @property
    def topics(self) -> dict[str, tuple[str, int]]:
        """topic -> (message type, message count from the bag's index)."""
        counts: dict[str, tuple[str, int]] = {}
        for conn in self.reader.connections:
            msgtype, count = counts.get(conn.topic, (conn.msgtype, 0))
            counts[conn.topic] = (msgtype, count + conn.msgcount)
        return counts

    def _connections(self, topics: Iterable[str]) -> list[Any]:
        wanted = set(topics)
        unknown = wanted - set(self.topics)
        if unknown:
            raise BagError(
                f'bag {self.name}: no topic {", ".join(sorted(unknown))}; it has: '
                f'{describe_topics(self.topics)}'
            )
        return [c for c in self.reader.connections if c.topic in wanted]

    def raw_messages(self, topics: Sequence[str] | None = None) -> Iterator[tuple[str, int, Any]]:
        """(topic, receive time in ns, CDR bytes) in receive-time order; one pass, no decoding.

        ``topics=None`` reads every topic. A storage error part-way through becomes a BagError
        naming the bag and the topics being read.
        """
        conns = self.reader.connections if topics is None else self._connections(topics)
        if not conns:
            return
        names = ', '.join(sorted({c.topic for c in conns}))
        try:
            for conn, t_ns, raw in self.reader.messages(connections=conns):
                yield conn.topic, t_ns, raw
        except _READ_ERRORS as err:
            raise BagError(f'bag {self.name}, topic {names}: cannot read: {err}') from err

    def deserialize(self, raw: Any, topic: str) -> Any:
        """One message from its CDR bytes; a malformed one raises BagError naming the topic."""
        msgtype = self._types.get(topic)
        if msgtype is None:
            raise BagError(
                f'bag {self.name}: no topic {topic}; it has: {describe_topics(self.topics)}'
            )
        try:
            return self.reader.deserialize(raw, msgtype)
        except _READ_ERRORS as err:
            raise BagError(
                f'bag {self.name}, topic {topic}: malformed {msgtype} message: {err}'
            ) from err

    def messages(self, topic: str, stamp: str = 'receive') -> Iterator[tuple[float, Any]]:
        """(seconds, message) of one topic in receive-time order.

        ``stamp='receive'`` (default): the bag's receive time, the clock this package aligns
        on (module docstring). ``stamp='header'``: the header stamp where the type has one and
        it is non-zero, else the receive time; the order stays the bag's.
        """
        if stamp not in STAMPS:
            raise BagError(f'stamp must be one of {", ".join(STAMPS)}, got {stamp!r}')
        for _, t_ns, raw in self.raw_messages([topic]):
            msg = self.deserialize(raw, topic)
            t = _seconds(t_ns)
            if stamp == 'header':
                t = header_stamp(msg) or t
            yield t, msg


ROS1_MAGIC = b'#ROSBAG V'


def _is_ros1_bag(path: Path) -> bool:
    """A ROS 1 bag file: by its magic line (a rosbag2 storage file never starts with it)."""
    try:
        with path.open('rb') as stream:
            return stream.read(len(ROS1_MAGIC)) == ROS1_MAGIC
    except OSError:
        return False


class _Rosbag2Directory(type(Path())):  # type: ignore[misc]
    """A rosbag2 directory named ``*.bag``: ``AnyReader`` takes any ``.bag`` path for ROS 1
    (by suffix alone), so the directory itself reports no suffix; its files keep theirs."""

    @property
    def suffix(self) -> str:
        return '' if self.is_dir() else super().suffix


def _reader_path(path: Path) -> Path:
    return _Rosbag2Directory(path) if path.suffix == '.bag' and path.is_dir() else path


def open_bag(path: str | Path) -> Bag:
    """Open a rosbag2 directory (mcap or sqlite3, with metadata.yaml) or one .mcap/.db3 file.

    Use as ``with open_bag(path) as bag: ...``; errors are BagError naming the bag.
    """
    return Bag(path).open()


def storage_files(path: str | Path) -> list[Path]:
    """The storage files of a bag (sorted), the directory's or the single file itself."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise BagError(f'bag {path}: no such file or directory')
    return sorted(
        p
        for p in path.iterdir()
        if p.is_file()
        and (p.suffix in STORAGE_SUFFIXES or p.name.endswith(('.mcap.zstd', '.db3.zstd')))
    )


def sha256_of_bag(path: str | Path) -> str:
    """SHA-256 over the bag's storage files in name order (not metadata.yaml, not the path).

    The recording's identity for a bundle's provenance and the frame cache: renaming or moving
    a bag keeps it; changing any recorded byte changes it.
    """
    files = storage_files(path)
    if not files:
        raise BagError(f'bag {path}: no storage files ({", ".join(STORAGE_SUFFIXES)})')
    digest = hashlib.sha256()
    for file in files:
        try:
            with file.open('rb') as stream:
                while chunk := stream.read(1 << 20):
                    digest.update(chunk)
        except OSError as err:
            raise BagError(f'bag {path}: cannot read {file.name}: {err}') from err
    return digest.hexdigest()


# -- summaries -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TopicInfo:
    """One topic of a bag: type, count and the spacing of its receive times (seconds)."""

    topic: str
    msgtype: str
    count: int
    first: float | None
    last: float | None
    rate: float | None  # messages per second over first..last; None below 2 messages
    max_gap: float  # the longest pause between two consecutive messages, 0 below 2 messages
    stamps: np.ndarray = field(repr=False, compare=False)  # receive times, seconds, sorted

    @property
    def duration(self) -> float:
        return 0.0 if self.first is None or self.last is None else self.last - self.first

    def gaps_over(self, seconds: float) -> int:
        """How many pauses between consecutive messages are longer than ``seconds``."""
        return int(np.count_nonzero(np.diff(self.stamps) > seconds))


@dataclass(frozen=True)
class BagSummary:
    """What a bag holds, from one raw pass over it (no message is deserialized)."""

    path: Path
    storage: str
    message_count: int
    start: float | None
    end: float | None
    topics: tuple[TopicInfo, ...]

    @property
    def duration(self) -> float:
        return 0.0 if self.start is None or self.end is None else self.end - self.start

    def topic(self, name: str) -> TopicInfo:
        for info in self.topics:
            if info.topic == name:
                return info
        raise BagError(f'bag {self.path}: no topic {name}; it has: {describe_topics(self)}')


def _topic_info(topic: str, msgtype: str, stamps: np.ndarray) -> TopicInfo:
    stamps = np.sort(stamps)
    count = len(stamps)
    first = float(stamps[0]) if count else None
    last = float(stamps[-1]) if count else None
    span = (last - first) if last is not None and first is not None else 0.0
    rate = (count - 1) / span if count >= 2 and span > 0 else None
    max_gap = float(np.diff(stamps).max()) if count >= 2 else 0.0
    return TopicInfo(topic, msgtype, count, first, last, rate, max_gap, stamps)


def summarize_open(
    bag: Bag, on_message: Callable[[str, int, Any], None] | None = None
) -> BagSummary:
    """``summarize`` for a bag that is already open.

    ``on_message(topic, t_ns, raw)`` sees every message of the same pass, so a caller can
    collect what it needs (e.g. commands) without reading the bag twice.
    """
    topics = bag.topics
    stamps: dict[str, list[int]] = {name: [] for name in topics}
    for topic, t_ns, raw in bag.raw_messages():
        stamps[topic].append(t_ns)
        if on_message is not None:
            on_message(topic, t_ns, raw)
    infos = tuple(
        _topic_info(name, msgtype, np.asarray(stamps[name], dtype=np.float64) * 1e-9)
        for name, (msgtype, _) in sorted(topics.items())
    )
    firsts = [i.first for i in infos if i.first is not None]
    lasts = [i.last for i in infos if i.last is not None]
    return BagSummary(
        path=bag.path,
        storage=bag.storage,
        message_count=sum(i.count for i in infos),
        start=min(firsts) if firsts else None,
        end=max(lasts) if lasts else None,
        topics=infos,
    )


def summarize(path: str | Path) -> BagSummary:
    """Topics, counts, rates and gaps of a bag (receive times; one pass, nothing decoded)."""
    with open_bag(path) as bag:
        return summarize_open(bag)


def describe_topics(source: BagSummary | dict[str, tuple[str, int]]) -> str:
    """'topic: type (count)' for each topic, for error messages that list what a bag has."""
    if isinstance(source, BagSummary):
        items = [(i.topic, i.msgtype, i.count) for i in source.topics]
    else:
        items = [(name, msgtype, count) for name, (msgtype, count) in sorted(source.items())]
    if not items:
        return '(no topics)'
    return ', '.join(f'{name}: {msgtype} ({count})' for name, msgtype, count in items)


class Topics(NamedTuple):
    """The camera and command topics of a bag and their kinds (see IMAGE_TYPES, CMD_TYPES)."""

    image_topic: str
    image_kind: str
    cmd_topic: str
    cmd_kind: str


def _listing(source: BagSummary | Bag) -> tuple[str, list[tuple[str, str, int]]]:
    if isinstance(source, BagSummary):
        return str(source.path), [(i.topic, i.msgtype, i.count) for i in source.topics]
    return source.name, [(n, t, c) for n, (t, c) in sorted(source.topics.items())]


def pick_topic(
    source: BagSummary | Bag, wanted: str | None, types: dict[str, str], what: str, flag: str
) -> tuple[str, str]:
    """(topic, kind) of the one non-empty topic of a type in ``types`` (type -> kind), or the
    one named ``wanted``, checked. Shared by every reader that finds its topics by type, so a
    missing, empty, ambiguous or mistyped topic reads the same everywhere: a BagError naming
    the bag, ``what`` it looked for, what the bag has and the ``flag`` that chooses."""
    name, items = _listing(source)
    has = describe_topics(source if isinstance(source, BagSummary) else source.topics)
    kinds = ' or '.join(types)
    if wanted is not None:
        found = [i for i in items if i[0] == wanted]
        if not found:
            raise BagError(f'bag {name}: no {what} topic {wanted}; it has: {has}')
        if found[0][1] not in types:
            raise BagError(f'bag {name}: {what} topic {wanted} is {found[0][1]}, expected {kinds}')
        chosen = found[0]
    else:
        candidates = [i for i in items if i[1] in types]
        if len(candidates) > 1:
            candidates = [i for i in candidates if i[2] > 0] or candidates
        if not candidates:
            raise BagError(f'bag {name}: no {what} topic ({kinds}); it has: {has}')
        if len(candidates) > 1:
            listing = ', '.join(f'{n}: {t} ({c})' for n, t, c in candidates)
            raise BagError(
                f'bag {name}: several {what} topics ({listing}); choose one with {flag}'
            )
        chosen = candidates[0]
    if chosen[2] == 0:
        raise BagError(f'bag {name}, topic {chosen[0]}: no messages; it has: {has}')
    return chosen[0], types[chosen[1]]


def find_topics(
    source: BagSummary | Bag, image_topic: str | None = None, cmd_topic: str | None = None
) -> Topics:
    """The camera and command topics: by type when not named; named ones are checked.
    A bag with one (non-empty) AppliedCommand topic is labelled from it.

    ``source`` is a summary or an open bag (its index counts suffice). A missing, empty or
    ambiguous topic, or a named one of the wrong type, is a BagError that lists what the bag
    has (topic: type (count)).
    """
    image = pick_topic(source, image_topic, IMAGE_TYPES, 'image', '--image-topic')
    if cmd_topic is None:
        # A drive with a takeover holds cmd_vel, teleop/cmd_vel and the driver's ~/applied:
        # label from what was applied (it says who drove), not from one of the requests.
        applied = [n for n, t, c in _listing(source)[1] if t == APPLIED_TYPE and c > 0]
        cmd_topic = applied[0] if len(applied) == 1 else None
    cmd = pick_topic(source, cmd_topic, CMD_TYPES, 'command', '--cmd-topic')
    return Topics(image[0], image[1], cmd[0], cmd[1])
