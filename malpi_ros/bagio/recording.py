"""Recordings that survive their recorder: split storage files, flushed as they go, and recovery.

A rosbag2 bag is only readable once it is closed: the mcap summary (its index) and
``metadata.yaml`` are written last. A recorder killed by SIGKILL, a power cut or a full disk
never gets there. So the recorder (``record_node``) writes through ``SplitWriter``:

- The bag is a sequence of storage files (``NAME_0.mcap``, ``NAME_1.mcap``, ...), split by
  duration and/or size like ``ros2 bag record --max-bag-duration/--max-bag-size``. The open
  file is written in ``NAME_k.open/`` (one ``rosbags`` Writer per split); when it is closed it
  moves up beside the others and ``metadata.yaml`` is rewritten (atomically) to list every
  closed file, as ``ros2 bag`` lists the files of a split bag. So at every moment the bag
  directory is a valid rosbag2 bag of the closed files, and a crash loses at most the open one.
- The open file is flushed every ``flush_period`` s: the mcap's pending chunk is closed and
  written, a sqlite3 file commits. What a crash leaves of the open file is then its messages up
  to the last flush.
- ``recover(bag)`` rebuilds every unfinished storage file of a bag — an open split left by a
  crash, a listed mcap whose end was cut off, a single-file bag without ``metadata.yaml`` —
  from the messages on disk (Foxglove's ``mcap`` reader reads a file without its summary, up to
  the first broken record; sqlite3 files are read by SQL), writes it again with ``rosbags`` and
  lists it in ``metadata.yaml``.

Pure Python (rosbags, mcap, sqlite3); no rclpy. ``rosbags``' Writer keeps its storage in the
attribute ``storage`` (pinned rosbags; the crash tests would catch a change).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import yaml
from mcap.data_stream import ReadDataStream
from mcap.exceptions import McapError
from mcap.opcode import Opcode
from mcap.reader import make_reader
from mcap.records import Channel, Chunk, Message, Schema
from mcap.stream_reader import StreamReader, breakup_chunk
from rosbags.interfaces import Qos
from rosbags.rosbag2 import Writer, WriterError
from rosbags.rosbag2.metadata import parse_qos
from rosbags.typesys import Stores, TypesysError, get_types_from_msg, get_typestore
from zstandard import ZstdError

from malpi_ros import diskspace
from malpi_ros.bagio.formats import STORAGES, check_storage
from malpi_ros.errors import BagError, ConfigError

SUFFIXES = {'mcap': '.mcap', 'sqlite3': '.db3'}
OPEN_SUFFIX = '.open'  # the directory of the split being written
METADATA = 'metadata.yaml'
KEY = 'rosbag2_bagfile_information'
FLUSH_PERIOD = 1.0  # s between flushes of the open file: what a crash may lose
MESSAGE_OVERHEAD = 32  # bytes a message costs besides its data (record header, index)

# What reading a damaged storage file can raise, past its last good record.
_BROKEN = (
    McapError,
    EOFError,
    struct.error,
    ValueError,
    KeyError,
    OSError,
    RuntimeError,  # lz4
    ZstdError,
)


@dataclass(frozen=True)
class Topic:
    """What a bag connection needs, kept to open the same connection in every split."""

    name: str
    msgtype: str
    msgdef: str
    rihs01: str
    offered: tuple[Qos, ...]
    serialization_format: str = 'cdr'


class SplitWriter:
    """A rosbag2 bag written as consecutive storage files; see the module docstring.

    ``max_duration`` (s of receive time) and ``max_bytes`` (message bytes) split it; None or 0
    never splits. ``closed_counts`` holds, per topic, the messages in closed (listed) files:
    what a reader of the bag will find. One thread uses it (sqlite3 wants that).
    """

    def __init__(
        self,
        path: str | Path,
        storage: str = 'mcap',
        *,
        max_duration: float | None = None,
        max_bytes: int | None = None,
        flush_period: float = FLUSH_PERIOD,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_storage(storage)
        if max_duration is not None and not max_duration >= 0:
            raise ConfigError(f'max_duration must be >= 0 s, got {max_duration!r}')
        if max_bytes is not None and not max_bytes >= 0:
            raise ConfigError(f'max_bytes must be >= 0, got {max_bytes!r}')
        self.path = Path(path)
        self.storage = storage
        self.max_duration_ns = int((max_duration or 0) * 1e9)
        self.max_bytes = int(max_bytes or 0)
        self.flush_period = flush_period
        self._clock = clock
        self.topics: dict[str, Topic] = {}
        self.closed_counts: dict[str, int] = {}
        self.closed_files: list[str] = []
        self.unfinished = ''  # the open file a failed close left behind (recover rebuilds it)
        self._writer: Writer | None = None
        self._connections: dict[str, Any] = {}
        self._counts: dict[str, int] = {}
        self._index = 0
        self._start_ns: int | None = None
        self._bytes = 0
        self._last_flush = 0.0

    # -- the bag -------------------------------------------------------------------------------

    def open(self) -> None:
        """Create the bag directory (refused when it exists) and the first split."""
        if self.path.exists():
            raise BagError(f'output bag {self.path} exists already; not overwriting it')
        try:
            self.path.mkdir(parents=True)
        except OSError as err:
            raise BagError(f'cannot create bag {self.path}: {err}') from err
        self._open_split()

    def add_topic(self, topic: Topic) -> None:
        self.topics[topic.name] = topic
        self._connect(topic)

    def write(self, topic: str, t_ns: int, data: bytes) -> None:
        """Write one message; splits and flushes as due. OSError on a full disk."""
        if self._writer is None:
            raise BagError(f'bag {self.path}: not open')
        if self._due(t_ns, len(data)):
            self._close_split()
            self._open_split()
        if self._start_ns is None:
            self._start_ns = t_ns
        self._writer.write(self._connections[topic], t_ns, data)
        self._counts[topic] += 1
        self._bytes += len(data) + MESSAGE_OVERHEAD
        if self._clock() - self._last_flush >= self.flush_period:
            self.flush()

    def flush(self) -> None:
        """Put what the open split holds on disk: a crash after this loses none of it."""
        self._last_flush = self._clock()
        storage = getattr(self._writer, 'storage', None)
        if storage is None:
            return
        if self.storage == 'mcap':
            if storage.chunk.bio.tell():
                storage.close_chunk()
            storage.bio.flush()
            os.fsync(storage.bio.fileno())
        else:
            storage.conn.commit()

    def close(self) -> None:
        """Close the open split and list it. If that fails (a full disk), the split is left
        unfinished in its ``.open`` directory for ``recover`` and the error is raised."""
        if self._writer is not None:
            self._close_split()

    # -- splits --------------------------------------------------------------------------------

    def _due(self, t_ns: int, size: int) -> bool:
        if self._start_ns is None:
            return False
        if self.max_duration_ns and t_ns - self._start_ns >= self.max_duration_ns:
            return True
        return bool(self.max_bytes) and self._bytes + size > self.max_bytes

    def _split_name(self) -> str:
        return f'{self.path.name}_{self._index}'

    def _open_split(self) -> None:
        directory = self.path / f'{self._split_name()}{OPEN_SUFFIX}'
        self._writer = Writer(directory, version=9, storage_plugin=STORAGES[self.storage])
        try:
            self._writer.open()
        except (WriterError, OSError, sqlite3.Error) as err:
            self._writer = None
            raise BagError(f'cannot create bag {self.path}: {err}') from err
        self._connections = {}
        self._counts = {}
        self._start_ns = None
        self._bytes = 0
        self._last_flush = self._clock()
        for topic in self.topics.values():
            self._connect(topic)

    def _connect(self, topic: Topic) -> None:
        assert self._writer is not None
        try:
            self._connections[topic.name] = _add_connection(self._writer, topic)
        except WriterError as err:
            raise BagError(f'bag {self.path}, topic {topic.name}: cannot add it: {err}') from err
        self._counts[topic.name] = 0

    def _close_split(self) -> None:
        writer, self._writer = self._writer, None
        assert writer is not None
        directory = writer.path
        try:
            writer.close()
        except (WriterError, OSError, sqlite3.Error) as err:
            with contextlib.suppress(Exception):
                writer.abort()
            self.unfinished = str(directory.relative_to(self.path))
            raise BagError(f'bag {self.path}: cannot finish {directory.name}: {err}') from err
        final = self.path / f'{self._split_name()}{SUFFIXES[self.storage]}'
        try:
            _adopt_split(directory, final, self.path)
        except OSError as err:  # e.g. no room for the new metadata.yaml: the file is unlisted
            self.unfinished = final.name if final.exists() else directory.name
            raise BagError(f'bag {self.path}: cannot list {final.name}: {err}') from err
        self.closed_files.append(final.name)
        for name, count in self._counts.items():
            self.closed_counts[name] = self.closed_counts.get(name, 0) + count
        self._index += 1


def _add_connection(writer: Writer, topic: Topic) -> Any:
    return writer.add_connection(
        topic.name,
        topic.msgtype,
        msgdef=topic.msgdef,
        rihs01=topic.rihs01,
        serialization_format=topic.serialization_format,
        offered_qos_profiles=list(topic.offered),
    )


# -- metadata.yaml: the list of closed files ---------------------------------------------------


def _adopt_split(directory: Path, final: Path, bag: Path) -> None:
    """Move a closed split's storage file up into the bag and list it in metadata.yaml."""
    split_meta = yaml.safe_load((directory / METADATA).read_text())[KEY]
    (storage_file,) = [directory / name for name in split_meta['relative_file_paths']]
    _fsync(storage_file)
    storage_file.replace(final)
    _rename_file(split_meta, final.name)
    _merge_metadata(bag, split_meta)
    shutil.rmtree(directory, ignore_errors=True)


def _rename_file(meta: dict[str, Any], name: str) -> None:
    meta['relative_file_paths'] = [name]
    for entry in meta['files']:
        entry['path'] = name


def _merge_metadata(bag: Path, split: dict[str, Any]) -> None:
    """metadata.yaml of ``bag`` with the split's file added (or replacing a file of its name);
    written to a temp file and renamed, so a crash leaves the old list or the new one.

    Per-topic counts are summed over the listed files, each read from the file's own summary
    (rosbag2 keeps only totals), so replacing a rebuilt file keeps them right.
    """
    path = bag / METADATA
    name = split['relative_file_paths'][0]
    current = yaml.safe_load(path.read_text())[KEY] if path.exists() else None
    kept = [] if current is None else [f for f in current['files'] if f['path'] != name]
    files = sorted(
        [*kept, split['files'][0]],
        key=lambda f: (f['starting_time']['nanoseconds_since_epoch'], f['path']),
    )
    counts = {
        e['topic_metadata']['name']: e['message_count'] for e in split['topics_with_message_count']
    }
    for f in kept:
        for topic, count in _file_counts(bag / f['path']).items():
            counts[topic] = counts.get(topic, 0) + count
    entries: dict[str, dict[str, Any]] = {}
    sources = [] if current is None else [current]
    for meta in [*sources, split]:
        for entry in meta['topics_with_message_count']:
            topic = entry['topic_metadata']['name']
            entries[topic] = {
                'topic_metadata': entry['topic_metadata'],
                'message_count': counts.get(topic, 0),
            }
    timed = [f for f in files if f['message_count']]
    start = min((f['starting_time']['nanoseconds_since_epoch'] for f in timed), default=0)
    end = max(
        (
            f['starting_time']['nanoseconds_since_epoch'] + f['duration']['nanoseconds']
            for f in timed
        ),
        default=0,
    )
    merged = dict(split)
    merged.update(
        relative_file_paths=[f['path'] for f in files],
        files=files,
        topics_with_message_count=list(entries.values()),
        message_count=sum(f['message_count'] for f in files),
        starting_time={'nanoseconds_since_epoch': start},
        duration={'nanoseconds': end - start},
    )
    tmp = path.with_name(f'.{METADATA}.tmp')
    with tmp.open('w') as stream:
        yaml.safe_dump({KEY: merged}, stream, default_flow_style=False)
        stream.flush()
        os.fsync(stream.fileno())
    tmp.replace(path)
    _fsync_dir(bag)


def _file_counts(file: Path) -> dict[str, int]:
    """Messages per topic of one closed storage file, from its summary (mcap) or by SQL."""
    counts: dict[str, int] = {}
    if file.suffix == '.mcap':
        with file.open('rb') as stream:
            summary = make_reader(stream).get_summary()
        if summary is None or summary.statistics is None:
            return counts
        for cid, count in summary.statistics.channel_message_counts.items():
            topic = summary.channels[cid].topic
            counts[topic] = counts.get(topic, 0) + count
        return counts
    conn = sqlite3.connect(f'file:{file}?mode=ro', uri=True)
    try:
        query = (
            'SELECT topics.name, COUNT(*) FROM messages JOIN topics '
            'ON messages.topic_id = topics.id GROUP BY topics.name'
        )
        return {topic: int(count) for topic, count in conn.execute(query)}
    finally:
        conn.close()


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError), path.open('rb') as stream:
        os.fsync(stream.fileno())


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def listed_files(bag: str | Path) -> list[str]:
    """The storage files metadata.yaml lists ([] when there is none or it is unreadable)."""
    path = Path(bag) / METADATA
    try:
        return list(yaml.safe_load(path.read_text())[KEY]['relative_file_paths'])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return []


# -- recovery ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recovered:
    """One storage file rebuilt from what was on disk."""

    source: str  # the unfinished file, relative to the bag
    file: str  # the rebuilt file, listed in metadata.yaml
    messages: int
    note: str = ''  # where reading stopped, when it stopped at a broken record


def finished(file: Path) -> bool:
    """An mcap whose summary reads (it was closed); a sqlite3 file commits as it goes."""
    if file.suffix != '.mcap':
        return True
    try:
        with file.open('rb') as stream:
            return make_reader(stream).get_summary() is not None
    except _BROKEN:
        return False


def unfinished_files(bag: str | Path) -> list[Path]:
    """Storage files of ``bag`` that a reader cannot use as they are: open splits left by a
    crash, listed mcap files without their end, storage files that metadata.yaml lacks."""
    bag = Path(bag)
    listed = set(listed_files(bag))
    found = []
    for entry in sorted(bag.iterdir()):
        if entry.is_dir() and entry.name.endswith(OPEN_SUFFIX):
            found += [f for f in sorted(entry.iterdir()) if f.suffix in ('.mcap', '.db3')]
        elif (
            entry.is_file()
            and entry.suffix in ('.mcap', '.db3')
            and (entry.name not in listed or not finished(entry))
        ):
            found.append(entry)
    return found


def recover(bag: str | Path) -> list[Recovered]:
    """Rebuild every unfinished storage file of ``bag`` and list it; returns what was done.

    BagError when ``bag`` is not a directory or nothing in it can be read.
    """
    bag = Path(bag)
    if not bag.is_dir():
        raise BagError(f'bag {bag}: not a rosbag2 directory')
    done = []
    for source in unfinished_files(bag):
        done.append(_rebuild(bag, source))
    return done


def _rebuild(bag: Path, source: Path) -> Recovered:
    storage = 'mcap' if source.suffix == '.mcap' else 'sqlite3'
    stem = source.stem.removesuffix(OPEN_SUFFIX)
    final = bag / f'{stem}{SUFFIXES[storage]}'
    work = bag / f'{stem}.recovering'
    shutil.rmtree(work, ignore_errors=True)
    read = _read_mcap(source) if storage == 'mcap' else _read_sqlite3(source)
    writer = Writer(work, version=9, storage_plugin=STORAGES[storage])
    count = 0
    try:
        with diskspace.full_disk_is_one_line(f'bag {bag}: rebuilding {source.name}'):
            writer.open()
            connections: dict[str, Any] = {}
            for topic in read.topics.values():
                connections[topic.name] = _add_connection(writer, topic)
            for name, t_ns, data in read.messages:
                writer.write(connections[name], t_ns, data)
                count += 1
            writer.close()
            built = [work / f for f in listed_files(work)]
            meta = yaml.safe_load((work / METADATA).read_text())[KEY]
            (built_file,) = built
            _fsync(built_file)
            built_file.replace(final)
            _rename_file(meta, final.name)
            _merge_metadata(bag, meta)
    except BaseException:
        with contextlib.suppress(Exception):
            writer.abort()
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    if source != final and source.exists():
        source.unlink()
    if source.parent != bag:
        shutil.rmtree(source.parent, ignore_errors=True)
    return Recovered(str(source.relative_to(bag)), final.name, count, read.note)


@dataclass
class _Read:
    topics: dict[str, Topic]
    messages: list[tuple[str, int, bytes]]
    note: str = ''


def _rihs01(msgtype: str, msgdef: str) -> str:
    """The RIHS01 hash of a type from the definition a storage file carries."""
    store = get_typestore(Stores.EMPTY)
    try:
        store.register(get_types_from_msg(msgdef, msgtype))
        return store.hash_rihs01(msgtype)
    except (TypesysError, KeyError) as err:
        raise BagError(f'cannot use the stored definition of {msgtype}: {err}') from err


def _read_mcap(source: Path) -> _Read:
    """Every schema, channel and message of an mcap up to its first broken record, and the
    whole records at the start of an uncompressed chunk that was cut off (the writer's last)."""
    schemas: dict[int, Schema] = {}
    channels: dict[int, Channel] = {}
    topics: dict[str, Topic] = {}
    messages: list[tuple[str, int, bytes]] = []

    def take(record: Any) -> None:
        if isinstance(record, Schema):
            schemas[record.id] = record
        elif isinstance(record, Channel) and record.schema_id in schemas:
            channels[record.id] = record
            schema = schemas[record.schema_id]
            msgdef = schema.data.decode()
            topics[record.topic] = Topic(
                record.topic,
                schema.name,
                msgdef,
                _rihs01(schema.name, msgdef),
                tuple(parse_qos(record.metadata.get('offered_qos_profiles', ''))),
                record.message_encoding,
            )
        elif isinstance(record, Message) and record.channel_id in channels:
            messages.append((channels[record.channel_id].topic, record.log_time, record.data))

    note = ''
    with source.open('rb') as stream:
        records = StreamReader(stream, emit_chunks=True).records
        while True:
            start = stream.tell()
            try:
                record = next(records)
                chunk_records = breakup_chunk(record) if isinstance(record, Chunk) else [record]
            except StopIteration:
                break
            except _BROKEN as err:
                note = f'read up to a broken or cut-off record at byte {start} ({_name(err)})'
                stream.seek(start)
                salvaged = _partial_chunk(stream)
                if salvaged:
                    note += f'; {len(salvaged)} records taken from the cut chunk'
                for inner in salvaged:
                    take(inner)
                break
            for inner in chunk_records:
                take(inner)
    if not topics:
        raise BagError(f'{source}: no readable message in it ({note or "no channel"})')
    messages.sort(key=lambda m: m[1])
    return _Read(topics, messages, note)


def _name(err: BaseException) -> str:
    return str(err) or type(err).__name__


def _partial_chunk(stream: Any) -> list[Any]:
    """The whole records of an uncompressed chunk whose end is missing (mcap's own readers
    parse the fields; a compressed chunk cannot be read in part and is dropped)."""
    data = ReadDataStream(stream)
    try:
        if data.read1() != Opcode.CHUNK:
            return []
        data.read8()  # record length: past the end of the file
        for _ in range(3):  # message start and end time, uncompressed size
            data.read8()
        data.read4()  # crc
        if data.read_prefixed_string() != '':
            return []
        data.read8()  # records length
    except _BROKEN:
        return []
    found: list[Any] = []
    inner = StreamReader(BytesIO(stream.read()), skip_magic=True).records
    with contextlib.suppress(*_BROKEN):
        for record in inner:
            found.append(record)
    return found


def _read_sqlite3(source: Path) -> _Read:
    """The committed topics and messages of a rosbag2 sqlite3 file (its tables, by SQL)."""
    try:
        conn = sqlite3.connect(f'file:{source}?mode=ro', uri=True)
        try:
            defs = {
                row[0]: row[1]
                for row in conn.execute(
                    'SELECT topic_type, encoded_message_definition FROM message_definitions'
                )
            }
            rows = conn.execute(
                'SELECT id, name, type, serialization_format, offered_qos_profiles FROM topics'
            ).fetchall()
            by_id: dict[int, str] = {}
            topics: dict[str, Topic] = {}
            for tid, name, msgtype, fmt, qos in rows:
                by_id[tid] = name
                msgdef = defs.get(msgtype, '')
                topics[name] = Topic(
                    name, msgtype, msgdef, _rihs01(msgtype, msgdef), tuple(parse_qos(qos)), fmt
                )
            messages = [
                (by_id[tid], t_ns, bytes(data))
                for tid, t_ns, data in conn.execute(
                    'SELECT topic_id, timestamp, data FROM messages ORDER BY timestamp'
                )
            ]
        finally:
            conn.close()
    except sqlite3.Error as err:
        raise BagError(f'{source}: cannot read it: {err}') from err
    return _Read(topics, messages)


def describe(done: Sequence[Recovered]) -> str:
    if not done:
        return 'nothing to recover: every storage file is finished and listed'
    lines = []
    for r in done:
        note = f' ({r.note})' if r.note else ''
        lines.append(f'{r.source} -> {r.file}: {r.messages} messages{note}')
    return '\n'.join(lines)
