"""Replaying recordings, the pure part: what to publish when, and how a replay-eval is scored.

``malpi-ros play`` and ``malpi-ros replay-eval`` are thin ROS shells (``player_node``,
``replay_eval_node``) around the functions here, which need no ROS graph and are tested
without one:

- Playback: ``PlayConfig`` (rate, start, duration, loop, topics, remaps), ``schedule`` (the
  bag's messages with the wall-clock offset each is due at), ``choose_qos`` (the QoS a replayed
  topic is published with), ``Throttle`` and ``progress_line`` (the progress line).
- Replay-eval: ``ReplayEvalConfig`` and ``node_arguments`` (how policy_node is run),
  ``restamp_cdr`` (a frame's header stamp set without decoding it), ``FramePlan`` (a frame
  evaluation stepped, with its label and offline action), ``FrameResult`` (what the live node
  did with it), ``episode_report`` / ``ReplayReport`` (the scores, and every frame where node
  and offline runtime differ, with the reason), ``plot_replay`` (the PNG).

Timing follows the bag's *receive* times (the recorder's clock, one clock for every topic; see
``bagio.reader``), scaled by ``rate``: a message received ``t`` s into the bag is published
``t / rate`` s after playback starts.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from malpi_ros.bagio.reader import IMAGE_TYPES
from malpi_ros.checks import is_number
from malpi_ros.errors import ConfigError, MalpiError
from malpi_ros.figures import figure
from malpi_ros.runtime.frame_gate import LATE, SKIPPED, FrameGate
from malpi_ros.runtime.node_stats import percentile

if TYPE_CHECKING:
    from malpi_ros.learn.evaluate import EvaluationReport

# Topics of these types are published best effort (sensor-data QoS), as camera drivers do.
SENSOR_TYPES = frozenset(IMAGE_TYPES)
SENSOR_DEPTH = 5  # rclpy's qos_profile_sensor_data depth: the writer's own cache, see choose_qos
RELIABLE_DEPTH = 10
SINGLE_MESSAGE_LOOP = 1.0  # s: the loop period of a window that holds one message


# -- playback ------------------------------------------------------------------------------


def absolute(topic: str) -> str:
    """``topic`` as a full name: recordings and the graph speak in '/camera/image_raw'."""
    topic = topic.strip()
    if not topic or topic == '/':
        raise ConfigError(f'a topic name must not be empty, got {topic!r}')
    return topic if topic.startswith('/') else f'/{topic}'


def parse_remap(text: str) -> tuple[str, str]:
    """'FROM:=TO' → (absolute FROM, absolute TO)."""
    parts = text.split(':=')
    if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
        raise ConfigError(
            f'a remap must be FROM:=TO (e.g. /camera/image_raw:=/image), got {text!r}'
        )
    return absolute(parts[0]), absolute(parts[1])


@dataclass(frozen=True)
class PlayConfig:
    """How to play a bag.

    ``rate``: speed factor (2 plays twice as fast). ``start``: seconds into the bag (from its
    first message) to begin at; ``duration``: seconds of the bag to play from there (None: to
    the end). ``loop``: play the window again and again (until stopped). ``topics``: only these
    (None: all). ``remaps``: (from, to) pairs of full topic names. ``wait_for_subscribers``:
    seconds to wait, before the first message, for every topic to have a subscriber;
    ``delay``: seconds more before the first message (a subscriber that joined the graph at
    the same time as the player may need them to match it).
    """

    rate: float = 1.0
    start: float = 0.0
    duration: float | None = None
    loop: bool = False
    topics: tuple[str, ...] | None = None
    remaps: tuple[tuple[str, str], ...] = ()
    wait_for_subscribers: float = 1.0
    delay: float = 0.0

    def __post_init__(self) -> None:
        if not (is_number(self.rate) and self.rate > 0):
            raise ConfigError(f'rate must be > 0, got {self.rate!r}')
        if not (is_number(self.start) and self.start >= 0):
            raise ConfigError(f'start must be >= 0 seconds, got {self.start!r}')
        if self.duration is not None and not (is_number(self.duration) and self.duration > 0):
            raise ConfigError(f'duration must be > 0 seconds, got {self.duration!r}')
        if not (is_number(self.wait_for_subscribers) and self.wait_for_subscribers >= 0):
            raise ConfigError(
                f'wait_for_subscribers must be >= 0 seconds, got {self.wait_for_subscribers!r}'
            )
        if not (is_number(self.delay) and self.delay >= 0):
            raise ConfigError(f'delay must be >= 0 seconds, got {self.delay!r}')
        if self.topics is not None:
            topics = tuple(dict.fromkeys(absolute(t) for t in self.topics))
            if not topics:
                raise ConfigError('topics must name at least one topic (or be None for all)')
            object.__setattr__(self, 'topics', topics)
        remaps = tuple((absolute(a), absolute(b)) for a, b in self.remaps)
        sources = [a for a, _ in remaps]
        if len(set(sources)) != len(sources):
            raise ConfigError(f'each topic can be remapped once, got {list(self.remaps)}')
        object.__setattr__(self, 'remaps', remaps)

    def target(self, topic: str) -> str:
        """The name ``topic`` is published under after the remaps."""
        return dict(self.remaps).get(topic, topic)


@dataclass(frozen=True)
class Scheduled:
    """One message to publish: ``due`` s after playback starts (rate applied), ``bag_time`` s
    after the bag's first message, in pass ``loop`` (0 for the first)."""

    due: float
    bag_time: float
    topic: str
    data: bytes
    loop: int


def schedule(
    read: Callable[[], Iterable[tuple[str, int, Any]]], bag_start_ns: int, cfg: PlayConfig
) -> Iterator[Scheduled]:
    """The messages of the window ``cfg.start`` .. ``cfg.start + cfg.duration`` with due times.

    ``read()`` gives (topic, receive time ns, CDR bytes) in receive-time order and is called
    once per pass (once, or again for every loop: nothing is held in memory). Time 0 is the
    window's start, so ``--start 10`` publishes its first message at once, not after 10 s.
    With ``loop``, the next pass starts one mean message spacing after the last message of the
    pass before (so a looped recording keeps its rhythm across the seam).
    """
    lo = bag_start_ns + round(cfg.start * 1e9)
    hi = None if cfg.duration is None else lo + round(cfg.duration * 1e9)
    offset = 0.0  # seconds of window time taken by the passes before
    loop = 0
    while True:
        first = last = None
        count = 0
        for topic, t_ns, data in read():
            if t_ns < lo:
                continue
            if hi is not None and t_ns > hi:
                break  # receive-time order: nothing later belongs to the window
            rel = (t_ns - lo) * 1e-9
            first = rel if first is None else first
            last = rel
            count += 1
            yield Scheduled(
                due=(offset + rel) / cfg.rate,
                bag_time=(t_ns - bag_start_ns) * 1e-9,
                topic=topic,
                data=data if isinstance(data, bytes) else bytes(data),
                loop=loop,
            )
        if not cfg.loop or first is None or last is None:
            return
        spacing = (last - first) / (count - 1) if count > 1 else SINGLE_MESSAGE_LOOP
        offset += last - first + max(spacing, 1e-3)
        loop += 1


@dataclass(frozen=True)
class TopicQos:
    """The QoS a replayed topic is published with (history is always keep-last)."""

    reliable: bool
    transient_local: bool
    depth: int

    @property
    def describe(self) -> str:
        kind = 'reliable' if self.reliable else 'best effort'
        latched = ', transient local' if self.transient_local else ''
        return f'{kind}{latched}, depth {self.depth}'


def choose_qos(msgtype: str, offered: Sequence[Any] | None = None) -> TopicQos:
    """Images: sensor data (best effort); everything else: reliable.

    Why best effort for images: it is what camera drivers offer, so a replay looks to the
    policy node as the robot's camera does, and a slow subscriber sees the newest frame instead
    of a reliable backlog (DESIGN §6: ~18 ms vs ~320 ms). It matches every subscriber that a
    camera matches (sensor-data QoS); a *reliable* subscriber of a camera gets nothing here as
    it would get nothing from the camera. The depth of a best-effort writer bounds only its own
    cache: what a subscriber keeps is set by the subscriber's depth (1 in policy_node).
    Transient local (a latched topic such as /tf_static) is kept when every publisher the bag
    recorded offered it, so late subscribers still get it; ``offered`` is the bag's list of
    rosbags ``Qos`` (None or empty when the bag did not record any).
    """
    latched = bool(offered) and all(
        getattr(getattr(q, 'durability', None), 'name', '') == 'TRANSIENT_LOCAL'
        for q in offered or ()
    )
    if msgtype in SENSOR_TYPES:
        return TopicQos(reliable=False, transient_local=False, depth=SENSOR_DEPTH)
    return TopicQos(reliable=True, transient_local=latched, depth=RELIABLE_DEPTH)


class Throttle:
    """True at most once per ``period`` seconds (for progress lines and repeated logs)."""

    def __init__(self, period: float) -> None:
        if not (is_number(period) and period >= 0):
            raise ConfigError(f'throttle period must be >= 0 seconds, got {period!r}')
        self.period = period
        self._last = -math.inf

    def ready(self, now: float) -> bool:
        if now - self._last >= self.period:
            self._last = now
            return True
        return False


def progress_line(bag_time: float, bag_duration: float, published: int, loop: int = 0) -> str:
    """'  12.3 / 60.0 s into the bag, 4567 messages published (loop 2)'."""
    looped = f' (loop {loop + 1})' if loop else ''
    return (
        f'{bag_time:6.1f} / {bag_duration:.1f} s into the bag, '
        f'{published} messages published{looped}'
    )


@dataclass
class PlayStats:
    """What a playback did, per topic (filled in as it goes)."""

    published: dict[str, int] = field(default_factory=dict)
    bag_time: float = 0.0
    loops: int = 0
    late_max: float = 0.0  # s: the furthest behind its due time a message was published
    interrupted: bool = False
    unmatched: tuple[str, ...] = ()  # topics with no subscriber when playback began
    wall: float = 0.0  # s from the first message's due time to the end

    @property
    def total(self) -> int:
        return sum(self.published.values())

    def count(self, topic: str) -> None:
        self.published[topic] = self.published.get(topic, 0) + 1

    def describe(self) -> str:
        how = 'interrupted' if self.interrupted else 'done'
        loops = f' in {self.loops + 1} passes' if self.loops else ''
        lines = [
            f'{how}: {self.total} messages published{loops} in {self.wall:.1f} s '
            f'(up to {self.bag_time:.1f} s into the bag; at most {self.late_max * 1e3:.0f} ms '
            'behind schedule)'
        ]
        lines += [f'  {topic}: {n}' for topic, n in sorted(self.published.items())]
        lines += [f'  {topic}: had no subscriber at the start' for topic in self.unmatched]
        return '\n'.join(lines)


# -- replay-eval: settings, the node's arguments, restamping ----------------------------

NAMESPACE = '/replay_eval'  # the node and its topics: nothing reaches a robot's /cmd_vel
_CDR_KINDS = {b'\x00\x00': '>', b'\x00\x01': '<'}  # CDR big / little endian encapsulation


@dataclass(frozen=True)
class ReplayEvalConfig:
    """How ``malpi-ros replay-eval`` drives the node.

    ``realtime`` False (default, *lockstep*): frame i+1 is published only once the node's output
    for frame i arrived (or ``frame_timeout`` passed), and the node's dt gate and age check are
    off, so it steps every frame evaluation stepped and the two must agree exactly. ``realtime``
    True: frames go out at the bag's timing (scaled by ``rate``) and the node runs with its own
    defaults, as on the robot; frames it skips are listed with the reason. ``node_params``:
    extra ``name:=value`` parameters for policy_node (they win over the ones set here).
    """

    backend: str = 'litert'
    reset_each_episode: bool = True
    realtime: bool = False
    rate: float = 1.0
    frame_timeout: float = 5.0
    startup_timeout: float = 60.0
    namespace: str = NAMESPACE
    image_topic: str | None = None
    cmd_topic: str | None = None
    node_params: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        from malpi_ros.runtime.policy import BACKENDS

        if self.backend not in BACKENDS:
            raise ConfigError(
                f'backend must be one of {", ".join(BACKENDS)}, got {self.backend!r}'
            )
        if not (is_number(self.rate) and self.rate > 0):
            raise ConfigError(f'rate must be > 0, got {self.rate!r}')
        for name in ('frame_timeout', 'startup_timeout'):
            value = getattr(self, name)
            if not (is_number(value) and value > 0):
                raise ConfigError(f'{name} must be > 0 seconds, got {value!r}')
        object.__setattr__(self, 'namespace', absolute(self.namespace).rstrip('/'))
        for name, value in self.node_params:
            if not name or not value or ':=' in name:
                raise ConfigError(f'a node parameter must be NAME:=VALUE, got {name}:={value}')

    def topic(self, name: str) -> str:
        """A topic of the replayed node: 'image', 'cmd_vel', 'policy_node/output', ..."""
        return f'{self.namespace}/{name}'


def parse_param(text: str) -> tuple[str, str]:
    """'NAME:=VALUE' → (NAME, VALUE), as ``--ros-args -p`` takes it."""
    name, sep, value = text.partition(':=')
    if not sep or not name.strip() or not value.strip():
        raise ConfigError(
            f'a node parameter must be NAME:=VALUE (e.g. num_threads:=1), got {text!r}'
        )
    return name.strip(), value.strip()


def node_arguments(
    cfg: ReplayEvalConfig, bundle: str, *, compressed: bool, reset_after_gap: float
) -> list[str]:
    """policy_node's command-line arguments for a replay (its ``--ros-args`` part).

    Lockstep: ``respect_dt`` and ``max_frame_age`` off (evaluation steps every frame; replayed
    stamps are from the past), ``reset_after_gap`` = the bundle's episode gap (evaluation
    starts a new episode there too). Realtime: the node's defaults.
    """
    params: dict[str, str] = {
        'bundle': bundle,
        'backend': cfg.backend,
        'compressed': 'true' if compressed else 'false',
        'selection': 'argmax',  # evaluation picks the argmax
    }
    if not cfg.realtime:
        params.update(
            respect_dt='false', max_frame_age='0.0', reset_after_gap=f'{float(reset_after_gap)!r}'
        )
    params.update(dict(cfg.node_params))
    args = ['--ros-args', '-r', f'__ns:={cfg.namespace}']
    for name, value in params.items():
        args += ['-p', f'{name}:={value}']
    return args


def restamp_cdr(data: bytes, stamp_ns: int) -> bytes:
    """A CDR-serialized stamped message (Image, CompressedImage: the header comes first) with
    its header stamp set to ``stamp_ns``; every other byte stays as it was."""
    order = _CDR_KINDS.get(bytes(data[:2]))
    if order is None or len(data) < 12:
        raise ConfigError(
            f'not a plain CDR message with a header first (encapsulation {bytes(data[:4]).hex()}, '
            f'{len(data)} bytes)'
        )
    sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
    if not -(2**31) <= sec < 2**31:
        raise ConfigError(f'stamp {stamp_ns} ns does not fit a builtin_interfaces/Time')
    return bytes(data[:4]) + struct.pack(f'{order}iI', sec, nanosec) + bytes(data[12:])


# -- replay-eval: scoring what the live node did -----------------------------------------

# Why a frame evaluation stepped has no node action equal to evaluation's.
REASONS = {
    'skipped': 'not stepped: it came sooner than 0.8*dt after the last stepped frame',
    'late': 'not stepped: older than max_frame_age, or not newer than the last stepped frame',
    'missing': 'published, but no output came back (lost, or replaced in the depth-1 queue)',
    'after_skip': 'an earlier frame of the episode was not stepped: the LSTM state differs',
    'reset': 'stepped from another state: the node reset where evaluation did not, or not '
    'where it did (its step count differs)',
    'differs': 'same frames since the same reset, different action: runtimes disagree',
}


@dataclass(frozen=True)
class FramePlan:
    """A frame evaluation stepped: where it is, its label and evaluation's action."""

    episode: int
    index: int  # position in the episode (0 = first after the reset)
    bag_time: float  # receive time in the bag, seconds (the clock labels are aligned on)
    label: int  # the human's action (from the recorded command)
    offline_action: int  # evaluation's action for this frame


@dataclass(frozen=True)
class FrameResult:
    """What the live node did with one planned frame.

    ``action``/``step`` from its ~/output (None: no output); ``reason`` says why there is none
    (a key of REASONS); ``latency``: seconds from publishing the frame to receiving the
    command computed from it.
    """

    published: bool
    action: int | None = None
    step: int | None = None
    latency: float | None = None
    reason: str | None = None


@dataclass(frozen=True)
class FrameDiff:
    """One frame where the node and evaluation did not give the same action."""

    episode: int
    index: int
    bag_time: float
    reason: str  # a key of REASONS
    offline_action: int
    node_action: int | None

    def to_dict(self, names: Sequence[str]) -> dict[str, Any]:
        return {
            'episode': self.episode,
            'index': self.index,
            'bag_time': round(self.bag_time, 6),
            'reason': self.reason,
            'why': REASONS[self.reason],
            'offline_action': names[self.offline_action],
            'node_action': None if self.node_action is None else names[self.node_action],
        }


def _share(mask: np.ndarray) -> float | None:
    return float(mask.mean()) if mask.size else None


@dataclass(frozen=True, eq=False)
class EpisodeReport:
    """Scores of one episode replayed through the node.

    Counts add up: ``frames = played + not_played`` and ``played = stepped + skipped``
    (``skipped`` here: every published frame without an output, whatever the reason).
    """

    episode: int
    frames: int
    played: int
    stepped: int
    label_agreement: float | None  # node action == human label, over stepped frames
    offline_label_agreement: float | None  # evaluation's action == label, over all frames
    offline_agreement: float | None  # node action == evaluation's, over stepped frames
    latencies: tuple[float, ...]
    diffs: tuple[FrameDiff, ...]
    times: np.ndarray = field(repr=False)  # bag seconds per planned frame
    labels: np.ndarray = field(repr=False)
    offline: np.ndarray = field(repr=False)
    node: np.ndarray = field(repr=False)  # -1 where the node gave no action

    @property
    def skipped(self) -> int:
        return self.played - self.stepped

    @property
    def not_played(self) -> int:
        return self.frames - self.played

    def to_dict(self, names: Sequence[str]) -> dict[str, Any]:
        p50, p99 = percentile(self.latencies, 50), percentile(self.latencies, 99)
        return {
            'episode': self.episode,
            'frames': self.frames,
            'played': self.played,
            'stepped': self.stepped,
            'skipped': self.skipped,
            'not_played': self.not_played,
            'label_agreement': self.label_agreement,
            'offline_label_agreement': self.offline_label_agreement,
            'offline_agreement': self.offline_agreement,
            'latency_ms': {
                'p50': None if p50 is None else p50 * 1e3,
                'p99': None if p99 is None else p99 * 1e3,
            },
            'differences': [d.to_dict(names) for d in self.diffs],
            'bag_times': [round(float(t), 6) for t in self.times],
            'labels': self.labels.tolist(),
            'offline_actions': self.offline.tolist(),
            'node_actions': self.node.tolist(),
        }


def episode_report(plan: Sequence[FramePlan], results: Sequence[FrameResult]) -> EpisodeReport:
    """Score one episode: ``results[i]`` is what the node did with ``plan[i]``.

    Every played frame whose node action is not evaluation's is listed with a reason: its own
    (skipped, late, missing), or, for a frame the node stepped: ``after_skip`` when an
    earlier frame of the episode had no output, ``reset`` when the node's step count is not the
    frame's position + 1 (its state was reset elsewhere), else ``differs``.
    """
    if len(plan) != len(results):
        raise ConfigError(f'episode plan has {len(plan)} frames but {len(results)} results')
    if not plan:
        raise ConfigError('an episode needs at least one frame')
    labels = np.array([p.label for p in plan], np.int64)
    offline = np.array([p.offline_action for p in plan], np.int64)
    node = np.array([-1 if r.action is None else r.action for r in results], np.int64)
    diffs = []
    gap_before = False
    for p, r in zip(plan, results, strict=True):
        if not r.published:
            continue  # counted in not_played: the replay stopped, the node never saw it
        if r.action is None:
            reason = r.reason or 'missing'
            if reason not in REASONS:
                raise ConfigError(f'unknown reason {reason!r}; known: {", ".join(REASONS)}')
            diffs.append(FrameDiff(p.episode, p.index, p.bag_time, reason, p.offline_action, None))
            gap_before = True
        elif r.action != p.offline_action:
            if gap_before:
                reason = 'after_skip'
            elif r.step is not None and r.step != p.index + 1:
                reason = 'reset'
            else:
                reason = 'differs'
            diffs.append(
                FrameDiff(p.episode, p.index, p.bag_time, reason, p.offline_action, r.action)
            )
    stepped = node >= 0
    return EpisodeReport(
        episode=plan[0].episode,
        frames=len(plan),
        played=sum(1 for r in results if r.published),
        stepped=int(stepped.sum()),
        label_agreement=_share((node == labels)[stepped]),
        offline_label_agreement=_share(offline == labels),
        offline_agreement=_share((node == offline)[stepped]),
        latencies=tuple(r.latency for r in results if r.latency is not None),
        diffs=tuple(diffs),
        times=np.array([p.bag_time for p in plan], np.float64),
        labels=labels,
        offline=offline,
        node=node,
    )


@dataclass(frozen=True, eq=False)
class ReplayReport:
    """Every episode of a replay-eval, with totals that add up over the episodes."""

    bundle: str
    bag: str
    image_topic: str
    names: tuple[str, ...]
    episodes: tuple[EpisodeReport, ...]
    interrupted: bool = False
    image_messages: int = 0  # camera messages in the bag
    commands_received: int = 0  # cmd_vel messages the node sent during the replay
    settings: dict[str, Any] = field(default_factory=dict)

    def total(self, attr: str) -> int:
        return sum(getattr(e, attr) for e in self.episodes)

    def _weighted(self, attr: str, weight: str) -> float | None:
        pairs = [
            (getattr(e, attr), getattr(e, weight))
            for e in self.episodes
            if getattr(e, attr) is not None
        ]
        total = sum(w for _, w in pairs)
        return sum(v * w for v, w in pairs) / total if total else None

    def to_dict(self) -> dict[str, Any]:
        latencies = [x for e in self.episodes for x in e.latencies]
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        diffs = [d for e in self.episodes for d in e.diffs]
        reasons = {key: sum(1 for d in diffs if d.reason == key) for key in REASONS}
        frames = self.total('frames')
        return {
            'bundle': self.bundle,
            'bag': self.bag,
            'image_topic': self.image_topic,
            'actions': list(self.names),
            'interrupted': self.interrupted,
            'settings': self.settings,
            'totals': {
                'episodes': len(self.episodes),
                'image_messages': self.image_messages,
                'frames': frames,
                'not_evaluated': self.image_messages - frames,
                'played': self.total('played'),
                'stepped': self.total('stepped'),
                'skipped': self.total('skipped'),
                'not_played': self.total('not_played'),
                'commands_received': self.commands_received,
                'label_agreement': self._weighted('label_agreement', 'stepped'),
                'offline_label_agreement': self._weighted('offline_label_agreement', 'frames'),
                'offline_agreement': self._weighted('offline_agreement', 'stepped'),
                'differences': len(diffs),
                'difference_reasons': {k: v for k, v in reasons.items() if v},
                'latency_ms': {
                    'p50': None if p50 is None else p50 * 1e3,
                    'p99': None if p99 is None else p99 * 1e3,
                },
            },
            'episodes': [e.to_dict(self.names) for e in self.episodes],
        }

    def describe(self, max_diffs: int = 20) -> str:
        """A terminal-readable report: totals, one line per episode, the differing frames."""
        data = self.to_dict()
        t = data['totals']

        def pct(value: float | None) -> str:
            return '    - ' if value is None else f'{value * 100:5.1f}%'

        def ms(value: float | None) -> str:
            return '    -' if value is None else f'{value:5.1f}'

        mode = 'realtime' if self.settings.get('realtime') else 'lockstep'
        lines = [
            f'replay-eval of {self.bundle} on {self.bag} ({self.image_topic}, {mode})'
            + ('  [INTERRUPTED: partial results]' if self.interrupted else ''),
            f'{t["image_messages"]} camera frames in the bag, {t["frames"]} in evaluation '
            f'episodes: {t["played"]} played, {t["stepped"]} stepped by the node, '
            f'{t["skipped"]} skipped, {t["not_played"]} not played; '
            f'{t["commands_received"]} cmd_vel received',
            f'agreement: node vs human {pct(t["label_agreement"])}, '
            f'evaluate vs human {pct(t["offline_label_agreement"])}, '
            f'node vs evaluate {pct(t["offline_agreement"])} '
            f'({t["differences"]} frames differ)',
            f'latency frame -> command: p50 {ms(t["latency_ms"]["p50"])} ms, '
            f'p99 {ms(t["latency_ms"]["p99"])} ms',
            '',
            ' ep frames played stepped skipped  vs human  vs evaluate  p50 ms  p99 ms',
        ]
        for e in data['episodes']:
            lat = e['latency_ms']
            lines.append(
                f'{e["episode"]:3d} {e["frames"]:6d} {e["played"]:6d} {e["stepped"]:7d} '
                f'{e["skipped"]:7d}    {pct(e["label_agreement"])}      '
                f'{pct(e["offline_agreement"])}  {ms(lat["p50"])}   {ms(lat["p99"])}'
            )
        diffs = [d for e in data['episodes'] for d in e['differences']]
        if diffs:
            lines += ['', f'frames where the node and evaluate differ ({len(diffs)}):']
            for d in diffs[:max_diffs]:
                lines.append(
                    f'  episode {d["episode"]} frame {d["index"]} (t={d["bag_time"]:.3f} s): '
                    f'evaluate {d["offline_action"]}, node {d["node_action"]}: {d["reason"]} '
                    f'- {d["why"]}'
                )
            if len(diffs) > max_diffs:
                lines.append(f'  ... {len(diffs) - max_diffs} more in report.json')
        return '\n'.join(lines)


def plot_replay(report: ReplayReport, path: str | Path) -> Path:
    """PNG of the human's, the node's and evaluate's actions over bag time, one row per episode.

    Frames the node did not step show as gaps in its line; differing frames are marked.
    """
    episodes = [e for e in report.episodes if e.frames] or []
    rows = max(1, len(episodes))
    size = (10, 1.2 + 1.8 * rows)
    with figure(path, nrows=rows, ncols=1, figsize=size, squeeze=False) as (fig, axes):
        names = list(report.names)
        for ax, ep in zip(axes[:, 0], episodes, strict=False):
            t = ep.times - ep.times[0]
            ax.step(t, ep.labels, where='post', color='black', lw=2.0, label='human')
            node = np.where(ep.node >= 0, ep.node, np.nan).astype(float)
            ax.step(t, node, where='post', color='tab:orange', lw=1.2, label='policy_node')
            ax.step(
                t, ep.offline, where='post', color='tab:blue', lw=1.0, ls='--', label='evaluate'
            )
            bad = [i for i, d in enumerate(ep.node) if d != ep.offline[i]]
            if bad:
                ax.plot(t[bad], ep.offline[bad], 'rx', ms=6, label='node != evaluate')
            if len(t) == 1:
                ax.set_xlim(-0.5, 0.5)
            ax.set_yticks(range(len(names)), labels=names)
            ax.set_ylim(-0.5, len(names) - 0.5)
            ax.set_ylabel(f'episode {ep.episode}')
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel('seconds into the episode (bag time)')
        if episodes:
            axes[0, 0].legend(loc='lower right', bbox_to_anchor=(1.0, 1.0), fontsize=8, ncol=4)
        title = f'{Path(report.bundle).name} on {Path(report.bag).name}: human vs policy action'
        fig.suptitle(title + (' (interrupted)' if report.interrupted else ''))
    return Path(path)


# -- replay-eval scoring (pure: the node side only collects) --------------------------------


@dataclass(frozen=True)
class Seen:
    """An output of the node as it arrived."""

    at: float  # time.monotonic() of its arrival
    action: int
    step: int
    enabled: bool


def plan_frames(
    evaluation: EvaluationReport, bag_start_ns: int
) -> tuple[list[FramePlan], list[int]]:
    """Evaluation's frames in time order, and each one's receive time (ns) in the bag."""
    plans: list[FramePlan] = []
    stamps: list[int] = []
    for ep in evaluation.episodes:
        for i in range(len(ep)):
            t_ns = round(float(ep.stamps[i]) * 1e9)
            plans.append(
                FramePlan(
                    episode=ep.index,
                    index=i,
                    bag_time=(t_ns - bag_start_ns) * 1e-9,
                    label=int(ep.labels[i]),
                    offline_action=int(ep.actions[i]),
                )
            )
            stamps.append(t_ns)
    if any(b <= a for a, b in itertools.pairwise(stamps)):
        raise MalpiError('evaluation episodes are not in the time order of the bag')
    return plans, stamps


def node_param(cfg: ReplayEvalConfig, name: str, default: Any) -> Any:
    """A policy_node parameter as the replayed node will have it (for the realtime verdicts)."""
    given = dict(cfg.node_params).get(name)
    if given is None:
        return default
    if isinstance(default, bool):
        return given.lower() == 'true'
    try:
        return type(default)(given)
    except ValueError as err:
        raise ConfigError(f'node parameter {name}: expected a number, got {given!r}') from err


def episode_reports(
    plans: Sequence[FramePlan], results: Sequence[FrameResult]
) -> tuple[EpisodeReport, ...]:
    """One report per episode, from the plans (in episode order, ``plan_frames``) and their
    results."""
    reports = []
    pairs = zip(plans, results, strict=True)
    for _, group in itertools.groupby(pairs, key=lambda pair: pair[0].episode):
        chosen = list(group)
        reports.append(episode_report([p for p, _ in chosen], [r for _, r in chosen]))
    return tuple(reports)


def frame_results(
    sent: Sequence[tuple[int, float] | None],
    outputs: dict[int, Seen],
    command_times: Sequence[float],
    gate: FrameGate | None,
) -> list[FrameResult]:
    """One FrameResult per planned frame, from what was sent (stamp ns, monotonic send time;
    None: not published), the node's outputs by stamp and the arrival times of its commands.
    ``gate``: the node's frame gate replayed (realtime runs), to tell skipped from late from
    lost."""
    commands = np.asarray(command_times, np.float64)
    publish_times = np.asarray([s[1] for s in sent if s is not None], np.float64)  # ascending
    results = []
    for item in sent:
        if item is None:
            results.append(FrameResult(published=False))
            continue
        stamp, at = item
        seen = outputs.get(stamp)
        verdict = None
        if gate is not None:
            decision = gate.decide(stamp * 1e-9, stamp * 1e-9)
            verdict = decision.verdict
            if seen is not None:
                gate.stepped(decision.time)
        if seen is None:
            reason = 'missing'
            if verdict == SKIPPED:
                reason = 'skipped'
            elif verdict == LATE:
                reason = 'late'
            results.append(FrameResult(published=True, reason=reason))
            continue
        latency = seen.at - at
        if seen.enabled:
            # Its command: the first cmd_vel after it and before the next frame went out.
            after = int(np.searchsorted(publish_times, at, side='right'))
            until = publish_times[after] if after < len(publish_times) else np.inf
            first = int(np.searchsorted(commands, at, side='left'))
            if first < len(commands) and commands[first] < until:
                latency = float(commands[first] - at)
        results.append(FrameResult(True, seen.action, seen.step, latency))
    return results
