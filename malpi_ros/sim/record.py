"""Record the simulator's expert as an ordinary rosbag2 (mcap): training data without a robot.

Example:
    from malpi_ros.sim.record import RecordConfig, record_expert
    result = record_expert('runs/expert_bag', RecordConfig(episodes=8, laps=3))
    print(result.frames, result.summaries)

The world is stepped in-process, faster than real time (no ROS graph, no waiting), and written
with ``rosbags`` exactly as a recording of the real robot would be: ``/camera/image_raw``
(sensor_msgs/Image, rgb8, header stamped at sim time) and ``/cmd_vel`` (geometry_msgs/Twist),
with receive times on the same sim clock. ``malpi-ros inspect`` and ``malpi-ros train`` read it
like any other bag. ``image_format='jpeg'`` writes ``/camera/image_raw/compressed``
(sensor_msgs/CompressedImage) instead, as image_transport names it and as robots usually record
(``ros2 bag record`` of a raw 160x120 stream is ~58 KB a frame; JPEG at quality 90 ~5 KB).
Measured: after the policy's preprocessing to 40x30, a quality-90 frame differs from the raw one
by 0.7 grey levels on average (max 4) - less than the simulated camera's own noise.

Timing of a frame and its command: frame ``k`` is rendered at sim time ``t_k``; the expert looks
at the pose it shows and its command is stamped ``t_k`` too (an instant reaction), then the world
moves ``dt`` under that command. So the default labelling (the latest command at or before the
frame, ``lag`` 0) pairs each frame with the action taken on seeing it - the same order as the
closed loop, where ``policy_node`` answers a frame within milliseconds and ``sim_node`` applies
the answer during the next ``dt``.

Episodes: each starts from ``SimWorld.reset(seed)`` at the start line and ends after ``laps``
laps; episodes are separated by a pause of ``episode_gap`` seconds, longer than the dataset's
episode gap, so training splits them (and holds whole episodes out for validation).

Short drives (``segments``): each starts from a fresh episode, drives unrecorded to the cue and
keeps the last ``segment_frames`` frames before a point just past the fork's start
(``segment_end`` metres, drawn per drive). The expert's branch choice at the fork is the one
action that needs memory, a handful of frames per lap; a full lap holds one such moment in ~330
frames, far too rare for training to pick up. A segment as long as a training window puts it in
every window's scored part.

Disturbances (``disturb_rate``, ``disturb_frames``): now and then, for a few frames, the robot's
wheels do not do what was commanded - a slip, a stalled motor, a bump - and it moves as another
action (forward, left or right) would move it. The bag records the commands as given (the
expert's, which keep answering what the camera shows), so it stays an honest recording, and it
shows what a perfect driver never does: how to get back on the line, and - when a turn into the
cued branch did not happen - that the turn is still due on the next frame.

``max_frames`` stops the recording after that many frames (mid-lap): the DAgger run's baseline
gets exactly as many clean expert frames as the rounds' corrections.

Supervised drives (``record_supervised``): a bundle's policy drives and the simulated person
(``sim.supervisor``) takes over when it strays, and the bag holds what a robot's recording of
such a drive holds (README "Takeover"): the camera, the policy's ``/cmd_vel``, the person's
``/teleop/cmd_vel`` while it drives, and ``/motor_driver_node/applied`` (what the motors got,
with its source), which training labels from - the DAgger rounds' data.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rosbags.rosbag2 import WriterError

from malpi_ros.bagio.formats import STORAGES
from malpi_ros.bagio.reader import APPLIED_TYPE
from malpi_ros.bagio.writer import BagWriter, Definitions
from malpi_ros.checks import int_at_least, non_negative, positive
from malpi_ros.errors import BagError, ConfigError
from malpi_ros.runtime.image import encode_image_fields
from malpi_ros.runtime.motor import wheel_throttles
from malpi_ros.runtime.takeover import POLICY, SOURCES, TELEOP
from malpi_ros.sim.supervisor import SupervisorConfig, drive_supervised
from malpi_ros.sim.world import SimConfig, SimWorld

IMAGE_TYPE = 'sensor_msgs/msg/Image'
COMPRESSED_TYPE = 'sensor_msgs/msg/CompressedImage'
IMAGE_FORMATS = ('raw', 'jpeg')
TWIST_TYPE = 'geometry_msgs/msg/Twist'
SWERVE_LABELS = ('commanded', 'expert')
# What a robot's recording of a takeover drive names them (README "Takeover").
APPLIED_TOPIC = '/motor_driver_node/applied'
TELEOP_TOPIC = '/teleop/cmd_vel'


@dataclass(frozen=True)
class RecordConfig:
    """How much expert driving to record, and how it is stamped and disturbed.

    ``start_time``: sim time (s since the epoch) of the first frame - a plausible wall-clock
    date, so tools that print stamps show something sensible. ``max_lap_time``: an episode
    whose lap takes longer than this (sim seconds) is a bug in the expert, reported as an error.
    """

    episodes: int = 8
    laps: int = 3
    seed: int = 0
    start_time: float = 1_750_000_000.0
    episode_gap: float = 5.0
    image_topic: str = '/camera/image_raw'
    image_format: str = 'raw'
    jpeg_quality: int = 90
    cmd_topic: str = '/cmd_vel'
    frame_id: str = 'camera'
    storage: str = 'mcap'
    max_lap_time: float = 120.0
    segments: int = 0
    segment_frames: int = 40
    segment_end: tuple[float, float] = (0.0, 0.25)
    disturb_rate: float = 0.0
    disturb_frames: int = 3
    max_frames: int = 0  # stop after this many frames; 0: no limit

    def __post_init__(self) -> None:
        int_at_least('record episodes', self.episodes, 0)
        int_at_least('record laps', self.laps, 1)
        int_at_least('record seed', self.seed, 0)
        non_negative('record start_time', self.start_time)
        positive('record episode_gap', self.episode_gap)
        for name in ('image_topic', 'cmd_topic'):
            value = getattr(self, name)
            if not (isinstance(value, str) and value.startswith('/') and len(value) > 1):
                raise ConfigError(f'record {name} must be an absolute topic name, got {value!r}')
        if self.image_format not in IMAGE_FORMATS:
            raise ConfigError(
                f'record image_format must be one of {", ".join(IMAGE_FORMATS)}, '
                f'got {self.image_format!r}'
            )
        if isinstance(self.jpeg_quality, bool) or self.jpeg_quality not in range(1, 101):
            raise ConfigError(f'record jpeg_quality must be 1..100, got {self.jpeg_quality!r}')
        if self.storage not in STORAGES:
            raise ConfigError(
                f'record storage must be one of {", ".join(STORAGES)}, got {self.storage!r}'
            )
        positive('record max_lap_time', self.max_lap_time)
        int_at_least('record segments', self.segments, 0)
        if self.episodes + self.segments == 0:
            raise ConfigError('record episodes and segments are both 0: nothing to record')
        int_at_least('record segment_frames', self.segment_frames, 1)
        end = tuple(self.segment_end)
        if not (
            len(end) == 2
            and all(isinstance(v, int | float) and v >= 0 for v in end)
            and end[0] <= end[1]
        ):
            raise ConfigError(
                f'record segment_end must be (low, high) metres past the fork start with '
                f'0 <= low <= high, got {self.segment_end!r}'
            )
        object.__setattr__(self, 'segment_end', end)
        if not (isinstance(self.disturb_rate, int | float) and 0.0 <= self.disturb_rate < 1.0):
            raise ConfigError(
                f'record disturb_rate must be a probability per frame in [0, 1), '
                f'got {self.disturb_rate!r}'
            )
        int_at_least('record disturb_frames', self.disturb_frames, 1)
        int_at_least('record max_frames', self.max_frames, 0)


@dataclass(frozen=True)
class RecordResult:
    """What was written: the bag, its size in frames and seconds, and each episode's progress."""

    bag: Path
    frames: int
    duration: float  # sim seconds of driving (pauses between episodes excluded)
    summaries: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    @property
    def laps(self) -> int:
        return sum(s['laps'] for s in self.summaries)

    @property
    def off_track_events(self) -> int:
        return sum(s['off_track_events'] for s in self.summaries)

    @property
    def forks(self) -> tuple[int, int]:
        """(cued branch taken, forks passed) over all episodes."""
        return (
            sum(s['forks_correct'] for s in self.summaries),
            sum(s['forks'] for s in self.summaries),
        )


def _stamp(store: Any, ns: int) -> Any:
    return store.types['builtin_interfaces/msg/Time'](sec=ns // 10**9, nanosec=ns % 10**9)


def image_cdr(store: Any, rgb: np.ndarray, ns: int, frame_id: str) -> bytes:
    """A sensor_msgs/Image (rgb8) stamped ``ns`` nanoseconds, serialized as CDR."""
    fields = encode_image_fields(rgb, 'rgb8')
    fields['data'] = np.frombuffer(fields['data'], np.uint8)
    header = store.types['std_msgs/msg/Header'](stamp=_stamp(store, ns), frame_id=frame_id)
    msg = store.types[IMAGE_TYPE](header=header, **fields)
    return bytes(store.serialize_cdr(msg, IMAGE_TYPE))


def jpeg_data(rgb: np.ndarray, quality: int) -> np.ndarray:
    """The JPEG bytes (uint8, 1-D) of an RGB frame: what a CompressedImage carries."""
    ok, buf = cv2.imencode(
        '.jpg', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB image
        raise BagError(f'cannot encode a {rgb.shape} frame as JPEG')
    return buf.reshape(-1)


def jpeg_cdr(store: Any, jpeg: np.ndarray, ns: int, frame_id: str) -> bytes:
    """A sensor_msgs/CompressedImage of ``jpeg`` bytes stamped ``ns`` ns, serialized as CDR."""
    header = store.types['std_msgs/msg/Header'](stamp=_stamp(store, ns), frame_id=frame_id)
    msg = store.types[COMPRESSED_TYPE](header=header, format='jpeg', data=jpeg)
    return bytes(store.serialize_cdr(msg, COMPRESSED_TYPE))


def twist_cdr(store: Any, linear: float, angular: float) -> bytes:
    """A geometry_msgs/Twist with linear.x and angular.z, serialized as CDR."""
    vector = store.types['geometry_msgs/msg/Vector3']
    msg = store.types[TWIST_TYPE](
        linear=vector(x=float(linear), y=0.0, z=0.0),
        angular=vector(x=0.0, y=0.0, z=float(angular)),
    )
    return bytes(store.serialize_cdr(msg, TWIST_TYPE))


class Disturbance:
    """Decides, per frame, whether the wheels misbehave and how they move instead (seeded)."""

    def __init__(self, config: RecordConfig, world: SimWorld, seed: int) -> None:
        self.rate = config.disturb_rate
        self.frames = config.disturb_frames
        self._rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
        names = world.actions.names
        self._moves = [names.index(n) for n in ('forward', 'left', 'right') if n in names]
        self._left = 0
        self._action = -1

    def motion(self, commanded: int) -> int:
        """The action the robot moves by this frame: ``commanded`` unless disturbed."""
        if self._left == 0 and self.rate and self._rng.random() < self.rate:
            others = [m for m in self._moves if m != commanded]
            if others:
                self._left = self.frames
                self._action = int(self._rng.choice(others))
        if self._left == 0:
            return commanded
        self._left -= 1
        return self._action


def record_expert(
    out: str | Path,
    config: RecordConfig | None = None,
    sim: SimConfig | None = None,
    *,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
    workers: int = 1,
) -> RecordResult:
    """Drive the expert and write the bag ``out``: ``episodes`` x ``laps`` laps, then
    ``segments`` short drives through cue and fork.

    ``out`` must not exist (rosbags refuses to overwrite; so do we). ``progress`` is called
    with (episode index, that episode's summary) after each episode. A bag that could not be
    finished is removed rather than left half-written. ``workers`` > 1 drives and encodes the
    episodes in that many processes (each episode has its own seed, so the bag is the same
    message for message); this process writes them in order.
    """
    config = config or RecordConfig()
    sim = sim or SimConfig()
    out = Path(out)
    if out.exists():
        raise BagError(f'{out} exists; recording never overwrites a bag')
    int_at_least('record workers', workers, 1)
    summaries: list[dict[str, Any]] = []
    with _Tape(out, config, sim) as tape:
        limited = config.max_frames > 0  # the rest of an episode is cut: one process
        room = (lambda: config.max_frames - tape.frames) if limited else None
        driven = _driven(out, config, sim, 1 if limited else workers, room)
        for episode, (frames, summary) in enumerate(driven):
            for payload, command in frames:
                tape.write(payload, command)
            summaries.append(summary)
            if progress is not None:
                progress(episode, summary)
            tape.pause()
    return RecordResult(out, tape.frames, tape.frames * sim.dt, tuple(summaries))


def recording_workers() -> int:
    """One recording process per core this process may run on: the recording is CPU-bound
    (rendering, noise, JPEG) and nothing else runs while it does."""
    return max(1, len(os.sched_getaffinity(0)))


# (encoded frame: JPEG bytes or the RGB array, the expert's action index) per frame of an
# episode, and the episode's summary.
Driven = tuple[list[tuple[np.ndarray, int]], dict[str, Any]]


def _driven(
    out: Path,
    config: RecordConfig,
    sim: SimConfig,
    workers: int,
    room: Callable[[], int] | None = None,
) -> Iterator[Driven]:
    """Every episode driven and encoded, in order: here (lazily, each with the ``room()``
    frames left when it starts; none left ends the recording), or in ``workers`` processes."""
    count = config.episodes + config.segments
    if workers == 1 or count < 2:
        world = SimWorld(sim, seed=config.seed)
        for episode in range(count):
            left = room() if room is not None else None
            if left is not None and left <= 0:
                return
            yield _drive_episode(world, out, config, episode, left)
        return
    # spawn, not fork: the caller may hold threads (a ROS context, TensorFlow's pools).
    context = multiprocessing.get_context('spawn')
    with context.Pool(
        min(workers, count), initializer=_start_worker, initargs=(out, config, sim)
    ) as pool:
        yield from pool.imap(_worker_episode, range(count), chunksize=4)


_WORKER: tuple[SimWorld, Path, RecordConfig] | None = None


def _start_worker(out: Path, config: RecordConfig, sim: SimConfig) -> None:
    global _WORKER
    _WORKER = (SimWorld(sim, seed=config.seed), out, config)


def _worker_episode(episode: int) -> Driven:
    assert _WORKER is not None, 'a recording worker runs _start_worker first'
    world, out, config = _WORKER
    return _drive_episode(world, out, config, episode)


def encoded(frame: np.ndarray, config: RecordConfig) -> np.ndarray:
    """A rendered RGB frame as the bag stores it: JPEG bytes, or the frame itself (raw)."""
    jpeg = config.image_format == 'jpeg'
    return jpeg_data(frame, config.jpeg_quality) if jpeg else frame


def _drive_episode(
    world: SimWorld, out: Path, config: RecordConfig, episode: int, room: int | None = None
) -> Driven:
    """Episode ``episode`` from ``SimWorld.reset`` with its own seed, frames encoded as the
    bag stores them; at most ``room`` frames (a lap episode stops there, mid-lap)."""
    seed = config.seed * 1000 + episode
    world.reset(seed)
    disturbance = Disturbance(config, world, seed)
    frames: list[tuple[np.ndarray, int]] = []

    def full() -> bool:
        return room is not None and len(frames) >= room

    def keep(frame: np.ndarray, command: int) -> None:
        if not full():
            frames.append((encoded(frame, config), command))

    if episode < config.episodes:
        _laps(world, out, disturbance, config, episode, keep, full)
    else:
        _segment(world, out, disturbance, config, seed, episode, keep)
    return frames, world.summary()


def record_supervised(
    out: str | Path,
    bundle: str | Path,
    laps: int,
    seed: int,
    config: RecordConfig | None = None,
    sim: SimConfig | None = None,
    supervisor: SupervisorConfig | None = None,
) -> RecordResult:
    """``bundle``'s policy drives ``laps`` laps (one episode) with the supervisor watching;
    the bag ``out`` holds the takeover drive as a robot records it (module doc).

    The closed loop is ``supervisor.drive_supervised`` (the policy steps through takeovers, the
    driver's hold after a release emulated); ``config`` gives the topics, image format, storage
    and start time (its episodes, segments and max_frames are not used). The summary adds
    ``takeovers`` and ``takeover_frames`` (frames whose applied source is teleop).
    """
    config = config or RecordConfig()
    sim = sim or SimConfig()
    out = Path(out)
    if out.exists():
        raise BagError(f'{out} exists; recording never overwrites a bag')
    with _Tape(out, config, sim, takeovers=True) as tape:
        summary = drive_supervised(
            Path(bundle),
            laps,
            seed,
            sim=sim,
            supervisor_config=supervisor,
            on_frame=tape.write_supervised,
        )
    return RecordResult(out, tape.frames, tape.frames * sim.dt, (summary,))


def expert_step(world: SimWorld, disturbance: Disturbance) -> tuple[np.ndarray, int]:
    """Render, let the expert command, move (disturbed or not); the frame and the command."""
    frame = world.render()
    command = world.expert_action()
    world.step(disturbance.motion(command))
    return frame, command


Keep = Callable[[np.ndarray, int], None]


def _laps(
    world: SimWorld,
    out: Path,
    disturbance: Disturbance,
    config: RecordConfig,
    episode: int,
    keep: Keep,
    full: Callable[[], bool],
) -> None:
    limit = math.ceil(config.laps * config.max_lap_time / world.config.dt)
    for _ in range(limit):
        if world.laps >= config.laps or full():
            return
        keep(*expert_step(world, disturbance))
    raise BagError(
        f'{out}: episode {episode} did not finish {config.laps} laps in '
        f'{config.laps * config.max_lap_time:.0f} s of sim time ({world.summary()})'
    )


def _segment(
    world: SimWorld,
    out: Path,
    disturbance: Disturbance,
    config: RecordConfig,
    seed: int,
    episode: int,
    keep: Keep,
) -> None:
    """The last ``segment_frames`` frames before a point just past the fork's start."""
    track = world.track
    rng = np.random.default_rng(np.random.SeedSequence([seed, 11]))
    end = track.fork_start + float(rng.uniform(*config.segment_end))
    # Frames are rendered only from where the segment can begin: a frame moves the robot at
    # most the fastest action's distance along the loop (plus slip), and rendering is most of
    # the cost of a frame.
    fastest = max(abs(a.linear_x) for a in world.actions.actions) * world.config.dt * 1.1
    render_from = end - (config.segment_frames + 5) * fastest
    buffer: deque[tuple[np.ndarray, int]] = deque(maxlen=config.segment_frames)
    # world.progress, not lap_s: at the start line lap_s may read a whole lap (start jitter).
    for _ in range(math.ceil(config.max_lap_time / world.config.dt)):
        if world.laps > 0 or world.progress >= end:
            break
        if world.progress < render_from:
            world.step(disturbance.motion(world.expert_action()))
        else:
            buffer.append(expert_step(world, disturbance))
    if world.laps > 0 or len(buffer) < config.segment_frames:
        raise BagError(
            f'{out}: segment {episode} did not reach the fork with '
            f'{config.segment_frames} frames ({world.summary()})'
        )
    for frame, command in buffer:
        keep(frame, command)


class _Tape:
    """The open bag and the sim clock it is stamped with.

    Used as a context manager: the bag is closed when the block ends cleanly and removed
    (never left half-written) when it raises or the close fails; a write error (``WriterError``,
    ``OSError``) comes out as a ``BagError`` naming the bag, any other exception unchanged.
    """

    def __init__(
        self, out: Path, config: RecordConfig, sim: SimConfig, *, takeovers: bool = False
    ) -> None:
        self.out = out
        self.config = config
        self.sim = sim
        self.dt_ns = round(sim.dt * 1e9)
        self.t_ns = round(config.start_time * 1e9)
        self.frames = 0
        store = None
        if takeovers:  # our AppliedCommand, from the installed package's msg/ (as the recorder)
            definitions = Definitions()
            definitions.definition(APPLIED_TYPE)
            store = definitions.store
        self.writer = BagWriter(out, config.storage, store=store).open()
        self.store = self.writer.store
        if config.image_format == 'jpeg':
            # image_transport's name and type for a compressed stream of image_topic
            self.image = f'{config.image_topic}/compressed'
            self.writer.add_topic(self.image, COMPRESSED_TYPE)
        else:
            self.image = config.image_topic
            self.writer.add_topic(self.image, IMAGE_TYPE)
        self.cmd = config.cmd_topic
        self.writer.add_topic(self.cmd, TWIST_TYPE)
        if takeovers:
            self.writer.add_topic(TELEOP_TOPIC, TWIST_TYPE)
            self.writer.add_topic(APPLIED_TOPIC, APPLIED_TYPE)

    def write(self, frame: np.ndarray, command: int) -> None:
        """One frame (JPEG bytes or RGB, as ``image_format`` says: ``encoded``) and its
        command, both stamped with the frame's sim time."""
        self._frame(frame)
        self._twist(self.cmd, command)
        self._advance()

    def write_supervised(
        self, frame: np.ndarray, requested: int, applied: int, overridden: bool
    ) -> None:
        """One frame (RGB) of a supervised drive: the policy's command, the person's while
        taking over, and what was applied (with its source), all stamped with the frame's sim
        time (the command's publish and apply stamps too: an instant reaction)."""
        self._frame(encoded(frame, self.config))
        self._twist(self.cmd, requested)
        if overridden:
            self._twist(TELEOP_TOPIC, applied)
        action = self.sim.actions.actions[applied]
        robot = self.sim.robot
        left, right = wheel_throttles(
            action.linear_x, action.angular_z, robot.track_width, robot.max_wheel_speed
        )
        stamp = _stamp(self.store, self.t_ns)
        msg = self.store.types[APPLIED_TYPE](
            header=self.store.types['std_msgs/msg/Header'](stamp=stamp, frame_id=''),
            source=SOURCES.index(TELEOP if overridden else POLICY),
            linear_x=float(action.linear_x),
            angular_z=float(action.angular_z),
            left=float(left),
            right=float(right),
            command_age=0.0,
            command_stamp=stamp,
            applied_stamp=stamp,
        )
        self.writer.write(APPLIED_TOPIC, self.t_ns, msg)
        self._advance()

    def _frame(self, frame: np.ndarray) -> None:
        t, cfg = self.t_ns, self.config
        if cfg.image_format == 'jpeg':
            data = jpeg_cdr(self.store, frame, t, cfg.frame_id)
        else:
            data = image_cdr(self.store, frame, t, cfg.frame_id)
        self.writer.write(self.image, t, data)

    def _twist(self, topic: str, command: int) -> None:
        action = self.sim.actions.actions[command]
        self.writer.write(
            topic, self.t_ns, twist_cdr(self.store, action.linear_x, action.angular_z)
        )

    def _advance(self) -> None:
        self.t_ns += self.dt_ns
        self.frames += 1

    def pause(self) -> None:
        """The pause between episodes: longer than a dataset's episode gap."""
        self.t_ns += round(self.config.episode_gap * 1e9)

    def __enter__(self) -> _Tape:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, traceback: Any
    ) -> None:
        failed = err
        if failed is None:
            try:
                self.writer.close()
                return
            except BaseException as close_err:
                failed = close_err
        self.discard()
        if isinstance(failed, WriterError | OSError):
            raise BagError(f'cannot write {self.out}: {failed}') from failed
        if failed is not err:
            raise failed

    def discard(self) -> None:
        """Close what can be closed and remove the unfinished bag directory."""
        # Best effort: the error that brought us here is the one to report.
        with contextlib.suppress(Exception):
            self.writer.close()
        shutil.rmtree(self.out, ignore_errors=True)
