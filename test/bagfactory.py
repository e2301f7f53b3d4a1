"""Synthetic rosbag2 recordings for tests: written with ``rosbags``, no ROS install needed.

``write_bag`` writes camera frames and velocity commands (and any extra topics) into a real
rosbag2 bag (mcap or sqlite3) with the Kilted typestore and CDR serialization; header stamps
and receive times are both ``t`` unless told otherwise. ``synthetic_drive`` and
``cue_memory_drive`` make data a model can learn from: the first shows the commanded action in
every frame, the second only in a cue frame several blank frames before the frame that needs it
(the "does the LSTM remember" task of DESIGN §4).

The image encoding here is written independently of ``malpi_ros.runtime.image`` on purpose: a test
helper that shared the decoder's code could not catch the decoder's mistakes.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from malpi_ros.bagio import formats
from malpi_ros.bagio.writer import BagWriter
from malpi_ros.config import ActionTable

_STORE = formats.typestore()

# (t seconds, rgb uint8 (H, W, 3) or (H, W)) or (t, rgb, field overrides for that message)
Frame = tuple[float, np.ndarray] | tuple[float, np.ndarray, Mapping[str, Any]]
Command = tuple[float, float, float]  # (t seconds, linear.x, angular.z)


def typestore() -> Any:
    """The typestore the bags are written with (build extra messages with its ``types``)."""
    return _STORE


def _time(t: float) -> Any:
    sec = math.floor(t)
    nanosec = round((t - sec) * 1e9)
    if nanosec >= 1_000_000_000:
        sec, nanosec = sec + 1, nanosec - 1_000_000_000
    return _STORE.types['builtin_interfaces/msg/Time'](sec=sec, nanosec=nanosec)


def header(t: float, frame_id: str = 'camera') -> Any:
    """A std_msgs/Header stamped ``t`` seconds (t=0 gives the all-zero 'unset' stamp)."""
    return _STORE.types['std_msgs/msg/Header'](stamp=_time(t), frame_id=frame_id)


def raw_image_fields(rgb: np.ndarray, encoding: str = 'rgb8') -> dict[str, Any]:
    """height, width, encoding, step, is_bigendian, data of an Image holding ``rgb``.

    Encodings: rgb8, bgr8, rgba8, bgra8, mono8 (a 2-D array is taken as is; RGB is converted
    with the ITU-R 601 weights, as cv2.cvtColor does). Each row is tightly packed.
    """
    rgb = np.asarray(rgb, dtype=np.uint8)
    if encoding == 'mono8':
        pixels = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    elif encoding == 'rgb8':
        pixels = rgb
    elif encoding == 'bgr8':
        pixels = rgb[..., ::-1]
    elif encoding in ('rgba8', 'bgra8'):
        colour = rgb if encoding == 'rgba8' else rgb[..., ::-1]
        alpha = np.full((*rgb.shape[:2], 1), 255, np.uint8)
        pixels = np.concatenate([colour, alpha], axis=-1)
    else:
        raise ValueError(f'bagfactory cannot encode {encoding!r}')
    pixels = np.ascontiguousarray(pixels)
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    return {
        'height': height,
        'width': width,
        'encoding': encoding,
        'step': width * channels,
        'is_bigendian': 0,
        'data': pixels.reshape(-1),
    }


def jpeg_bytes(rgb: np.ndarray, quality: int = 95) -> np.ndarray:
    """JPEG of an RGB (or 2-D mono) uint8 array, as a uint8 array for CompressedImage.data."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    bgr = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode('.jpg', bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok, 'cv2.imencode failed'
    return buf.reshape(-1)


def zero_png(width: int, height: int, rows_per_block: int = 160, colour: bool = False) -> bytes:
    """A valid PNG of zeros (grey, or RGB), width x height, built without encoding its pixels.

    A "PNG bomb" for the decode limits: 20000 x 20000 is ~390 KB but 400 Mpx once decoded. The
    deflate stream is one block of rows, flushed (Z_FULL_FLUSH makes every later block encode
    alike), repeated; the Adler-32 of n zero bytes is ``(n % 65521) << 16 | 1``.
    """
    assert height % rows_per_block == 0, 'height must be a multiple of rows_per_block'
    row = width * (3 if colour else 1) + 1  # a filter byte (0: none) and the pixels
    deflate = zlib.compressobj(9)
    block = bytes(row * rows_per_block)
    first = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    again = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    adler = ((row * height) % 65521) << 16 | 1
    idat = first + again * (height // rows_per_block - 1) + b'\x03\x00' + struct.pack('>I', adler)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
        )

    # 8 bits, grey (0) or RGB (2), no interlace
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2 if colour else 0, 0, 0, 0)
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', idat) + chunk(b'IEND', b'')


def image_msg(
    t: float,
    rgb: np.ndarray,
    *,
    compressed: bool = False,
    encoding: str = 'rgb8',
    overrides: Mapping[str, Any] | None = None,
) -> Any:
    """A sensor_msgs Image (or CompressedImage, jpeg) stamped ``t``; ``overrides`` replace
    fields (e.g. ``{'data': b'short'}``) to make malformed frames on purpose."""
    if compressed:
        fields: dict[str, Any] = {'format': 'jpeg', 'data': jpeg_bytes(rgb)}
        msgtype = 'sensor_msgs/msg/CompressedImage'
    else:
        fields = raw_image_fields(rgb, encoding)
        msgtype = 'sensor_msgs/msg/Image'
    fields['header'] = header(t)
    for key, value in (overrides or {}).items():
        fields[key] = np.frombuffer(value, np.uint8) if isinstance(value, bytes) else value
    return _STORE.types[msgtype](**fields)


def twist_msg(t: float, linear: float, angular: float, *, stamped: bool = False) -> Any:
    """A geometry_msgs Twist (or TwistStamped stamped ``t``) with linear.x and angular.z."""
    vector = _STORE.types['geometry_msgs/msg/Vector3']
    twist = _STORE.types['geometry_msgs/msg/Twist'](
        linear=vector(x=float(linear), y=0.0, z=0.0),
        angular=vector(x=0.0, y=0.0, z=float(angular)),
    )
    if not stamped:
        return twist
    return _STORE.types['geometry_msgs/msg/TwistStamped'](
        header=header(t, 'base_link'), twist=twist
    )


APPLIED_TYPE = 'malpi_ros/msg/AppliedCommand'
OUTPUT_TYPE = 'malpi_ros/msg/PolicyOutput'


def _ours(msgtype: str) -> Any:
    """A message class of our package: its type is read from the installed package's ``.msg``
    file, as the recorder reads it."""
    if msgtype not in _STORE.fielddefs:
        from malpi_ros.bagio.writer import Definitions

        defs = Definitions()
        defs.definition(msgtype)
        _STORE.register({msgtype: defs.store.fielddefs[msgtype]})
    return _STORE.types[msgtype]


def _time_ns(ns: int) -> Any:
    sec, nanosec = divmod(int(ns), 1_000_000_000)
    return _STORE.types['builtin_interfaces/msg/Time'](sec=sec, nanosec=nanosec)


def applied_msg(
    t: float,
    source: int,
    linear: float,
    angular: float,
    *,
    command_ns: int = 0,
    applied_ns: int = 0,
) -> Any:
    """motor_driver_node's ~/applied (malpi_ros/msg/AppliedCommand, stamped ``t``); the
    command's publish stamp and the applied stamp in ns (0: unset)."""
    return _ours(APPLIED_TYPE)(
        header=header(t, ''),
        source=source,
        linear_x=float(linear),
        angular_z=float(angular),
        left=0.0,
        right=0.0,
        command_age=0.0,
        command_stamp=_time_ns(command_ns),
        applied_stamp=_time_ns(applied_ns),
    )


def output_msg(
    frame_ns: int,
    stages_ns: Sequence[int] = (0, 0, 0, 0),
    *,
    action: int = 1,
    overridden: bool = False,
) -> Any:
    """policy_node's ~/output (malpi_ros/msg/PolicyOutput) for a frame stamped ``frame_ns``,
    with the stage stamps received, preprocessed, stepped, published (ns; 0: unset)."""
    received, preprocessed, stepped, published = stages_ns
    return _ours(OUTPUT_TYPE)(
        header=_STORE.types['std_msgs/msg/Header'](stamp=_time_ns(frame_ns), frame_id='camera'),
        probabilities=np.array([0.1, 0.9], np.float32),
        action=action,
        action_name='forward',
        step=1,
        inference_ms=1.0,
        enabled=bool(published),
        overridden=overridden,
        received=_time_ns(received),
        preprocessed=_time_ns(preprocessed),
        stepped=_time_ns(stepped),
        published=_time_ns(published),
    )


def write_bag(
    path: str | Path,
    *,
    storage: str = 'mcap',
    frames: Sequence[Frame] = (),
    commands: Sequence[Command] = (),
    image_topic: str | None = '/camera/image_raw',
    cmd_topic: str | None = '/cmd_vel',
    compressed: bool = False,
    stamped: bool = False,
    encoding: str = 'rgb8',
    extra_topics: Iterable[tuple[str, str, float, Any]] = (),
    header_offset: float = 0.0,
) -> Path:
    """Write a rosbag2 bag at ``path`` (a new directory) and return ``path``.

    ``frames``: (t, rgb) or (t, rgb, overrides); ``commands``: (t, linear.x, angular.z).
    ``image_topic``/``cmd_topic`` None leaves that topic out of the bag entirely.
    ``extra_topics``: (topic, msgtype, t, message) for anything else (build messages with
    ``typestore().types``). Receive time is ``t``; header stamps are ``t + header_offset``
    (an offset imitates a sender on another clock). Messages are written in time order.
    """
    path = Path(path)
    formats.check_storage(storage)
    image_type = 'sensor_msgs/msg/CompressedImage' if compressed else 'sensor_msgs/msg/Image'
    cmd_type = 'geometry_msgs/msg/TwistStamped' if stamped else 'geometry_msgs/msg/Twist'
    records: list[tuple[int, str, str, Any]] = []  # (t ns, topic, msgtype, message)
    if image_topic is not None:
        for frame in frames:
            t, rgb = frame[0], frame[1]
            overrides = frame[2] if len(frame) > 2 else None  # type: ignore[misc]
            msg = image_msg(
                t + header_offset,
                rgb,
                compressed=compressed,
                encoding=encoding,
                overrides=overrides,
            )
            records.append((_ns(t), image_topic, image_type, msg))
    if cmd_topic is not None:
        for t, linear, angular in commands:
            msg = twist_msg(t + header_offset, linear, angular, stamped=stamped)
            records.append((_ns(t), cmd_topic, cmd_type, msg))
    for topic, msgtype, t, msg in extra_topics:
        records.append((_ns(t), topic, msgtype, msg))
    records.sort(key=lambda r: r[0])

    with BagWriter(path, storage, store=_STORE) as writer:
        # Declare the main topics even when empty, so a bag 'with a topic but no messages'
        # can be written.
        declared = [(image_topic, image_type), (cmd_topic, cmd_type)]
        declared += [(topic, msgtype) for _, topic, msgtype, _ in records]
        for topic, msgtype in declared:
            if topic is not None:
                writer.add_topic(topic, msgtype)
        for t_ns, topic, _, msg in records:
            writer.write(topic, t_ns, msg)
    return path


def _ns(t: float) -> int:
    return round(t * 1e9)


def mcap_file(bag: str | Path) -> Path:
    """The one .mcap storage file of a bag directory (to truncate it, or open it alone)."""
    files = sorted(Path(bag).glob('*.mcap'))
    assert len(files) == 1, f'expected one .mcap in {bag}, found {files}'
    return files[0]


# -- data a model can learn from -----------------------------------------------------------

# One colour per action index (RGB); more actions than colours cycle with a darker shade.
PALETTE = np.array(
    [
        (128, 128, 128),  # stop: grey
        (0, 200, 0),  # forward: green
        (230, 30, 30),  # left: red
        (30, 60, 230),  # right: blue
        (230, 200, 0),  # backward: yellow
        (200, 0, 200),
        (0, 200, 200),
        (255, 128, 0),
    ],
    dtype=np.uint8,
)
JUNCTION_COLOUR = np.array((255, 255, 255), np.uint8)


def action_colour(index: int) -> np.ndarray:
    """The colour synthetic frames show for action ``index``."""
    colour = PALETTE[index % len(PALETTE)].astype(np.int32)
    return (colour // (1 + index // len(PALETTE))).astype(np.uint8)


@dataclass(frozen=True)
class Drive:
    """A synthetic recording: what to pass to ``write_bag`` and the labels it must give.

    ``labels[i]`` is the action index frame ``i`` should be labelled with; ``junctions`` marks
    the frames that need memory (cue task; all False for ``synthetic_drive``).
    """

    frames: list[tuple[float, np.ndarray]]
    commands: list[Command]
    labels: np.ndarray
    junctions: np.ndarray

    def __len__(self) -> int:
        return len(self.frames)


def _background(rng: np.random.Generator, height: int, width: int, noise: int) -> np.ndarray:
    base = np.full((height, width, 3), 40, np.int16)
    if noise:
        base += rng.integers(-noise, noise + 1, size=base.shape, dtype=np.int16)
    return np.clip(base, 0, 255).astype(np.uint8)


def _with_bar(frame: np.ndarray, colour: np.ndarray) -> np.ndarray:
    height = frame.shape[0]
    out = frame.copy()
    out[height // 3 : 2 * height // 3] = colour
    return out


def _commands_for(
    labels: np.ndarray, stamps: np.ndarray, table: ActionTable, lead: float
) -> list[Command]:
    return [
        (float(t) - lead, table.actions[a].linear_x, table.actions[a].angular_z)
        for t, a in zip(stamps, labels, strict=True)
    ]


def synthetic_drive(
    n: int = 60,
    *,
    dt: float = 0.1,
    start: float = 1000.0,
    height: int = 24,
    width: int = 32,
    table: ActionTable | None = None,
    actions: Sequence[int] | None = None,
    hold: tuple[int, int] = (3, 8),
    noise: int = 10,
    seed: int = 0,
) -> Drive:
    """``n`` frames every ``dt`` s from ``start``: each shows a bar in its action's colour.

    The action changes every ``hold`` (min, max) frames, drawn from ``actions`` (indices into
    ``table``; all by default). A command with that action's linear.x/angular.z is sent a
    quarter frame before each frame, so aligning with lag 0 gives exactly ``labels``.
    """
    table = table or ActionTable()
    choices = list(range(len(table))) if actions is None else list(actions)
    rng = np.random.default_rng(seed)
    labels = np.empty(n, np.int64)
    i = 0
    while i < n:
        length = int(rng.integers(hold[0], hold[1] + 1))
        labels[i : i + length] = choices[int(rng.integers(len(choices)))]
        i += length
    stamps = start + dt * np.arange(n)
    frames = [
        (float(t), _with_bar(_background(rng, height, width, noise), action_colour(a)))
        for t, a in zip(stamps, labels, strict=True)
    ]
    return Drive(frames, _commands_for(labels, stamps, table, dt / 4), labels, np.zeros(n, bool))


def cue_memory_drive(
    trials: int = 10,
    *,
    blanks: tuple[int, int] = (4, 6),
    after: int = 2,
    dt: float = 0.1,
    start: float = 1000.0,
    height: int = 24,
    width: int = 32,
    table: ActionTable | None = None,
    cue_actions: tuple[str, str] = ('left', 'right'),
    cruise_action: str = 'forward',
    noise: int = 10,
    seed: int = 0,
) -> Drive:
    """Trials of: a cue frame (bar in the colour of a turn), ``blanks`` (min, max; >= 4)
    blank frames, one junction frame (white bar, the same for every cue) labelled with the turn
    the cue showed, then ``after`` blank frames. Every other frame is labelled
    ``cruise_action``. Only a model that remembers the cue can get the junctions right.
    """
    if blanks[0] < 4 or blanks[1] < blanks[0]:
        raise ValueError(f'blanks must be (min >= 4, max >= min), got {blanks}')
    table = table or ActionTable()
    turn = [table.names.index(name) for name in cue_actions]
    cruise = table.names.index(cruise_action)
    rng = np.random.default_rng(seed)
    images: list[np.ndarray] = []
    labels: list[int] = []
    junctions: list[bool] = []

    def add(image: np.ndarray, label: int, junction: bool = False) -> None:
        images.append(image)
        labels.append(label)
        junctions.append(junction)

    for _ in range(trials):
        side = turn[int(rng.integers(2))]
        add(_with_bar(_background(rng, height, width, noise), action_colour(side)), cruise)
        for _ in range(int(rng.integers(blanks[0], blanks[1] + 1))):
            add(_background(rng, height, width, noise), cruise)
        add(_with_bar(_background(rng, height, width, noise), JUNCTION_COLOUR), side, True)
        for _ in range(after):
            add(_background(rng, height, width, noise), cruise)
    label_array = np.asarray(labels, np.int64)
    stamps = start + dt * np.arange(len(images))
    frames = [(float(t), image) for t, image in zip(stamps, images, strict=True)]
    return Drive(
        frames,
        _commands_for(label_array, stamps, table, dt / 4),
        label_array,
        np.asarray(junctions, bool),
    )
