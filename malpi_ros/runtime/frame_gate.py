"""Which camera frames the policy steps on, and when silence means stop: pure timing logic.

An LSTM learns dynamics at the frame period it was trained on (DESIGN §4), so ``policy_node``
steps at most once per bundle ``dt``, on the newest frame, never on a frame older than one it
already stepped on, and starts a new sequence after a gap (training starts a new episode after
one too). Decisions use the frames' stamps (when the camera saw them), not arrival times, so
transport jitter does not change what the policy sees. Kept out of the node so it is tested with
plain numbers (DESIGN §7).
"""

from __future__ import annotations

from dataclasses import dataclass

from malpi_ros.checks import is_number
from malpi_ros.errors import ConfigError

# Frames closer than this fraction of dt are skipped: 10 Hz frames with a few ms of jitter
# must not be skipped when dt is 0.1 s, and 30 Hz frames must be when dt is 0.1 s.
DT_TOLERANCE = 0.8

STEP = 'step'
LATE = 'late'  # older than max_frame_age, or not newer than the last stepped frame
SKIPPED = 'skipped'  # newer, but sooner than DT_TOLERANCE * dt after the last stepped frame


@dataclass(frozen=True)
class Decision:
    """What to do with one frame.

    ``time``: the frame's time (its stamp, or the receive time for a zero stamp), to pass to
    ``FrameGate.stepped``; ``age``: receive time minus that (s, >= 0); ``reset``: zero the state
    before stepping, with ``why`` ('gap', 'time jumped back' or 'every frame').
    """

    verdict: str
    time: float
    age: float
    reset: bool = False
    why: str = ''


def _seconds(name: str, value: float, allow_zero: bool = False) -> None:
    if not is_number(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f'{name} must be a number of seconds > 0, got {value!r}')


class FrameGate:
    """Decides per frame: step (maybe after a reset), skip (too soon) or drop (too old).

    ``decide`` does not change the gate; call ``stepped(decision.time)`` once the step went
    through, so a frame that turns out malformed does not count as the last stepped one.
    Not thread-safe: the node calls it from its one image callback.
    """

    def __init__(
        self,
        dt: float,
        *,
        max_frame_age: float = 0.5,
        reset_after_gap: float = 1.0,
        respect_dt: bool = True,
        reset_every_frame: bool = False,
    ) -> None:
        _seconds('dt', dt)
        _seconds('max_frame_age', max_frame_age, allow_zero=True)
        _seconds('reset_after_gap', reset_after_gap)
        self.dt = float(dt)
        self.max_frame_age = float(max_frame_age)
        self.reset_after_gap = float(reset_after_gap)
        self.respect_dt = respect_dt
        self.reset_every_frame = reset_every_frame
        self.last: float | None = None  # time of the last stepped frame

    def decide(self, stamp: float, now: float) -> Decision:
        """``stamp``: the frame's header stamp (s; 0 = unset), ``now``: receive time (s)."""
        t = stamp if stamp > 0 else now
        age = max(0.0, now - t)  # a stamp ahead of now (clock skew) counts as fresh
        if self.max_frame_age > 0 and age > self.max_frame_age:
            return Decision(LATE, t, age)
        every = self.reset_every_frame
        if self.last is None:
            return Decision(STEP, t, age, every, 'every frame' if every else '')
        gap = t - self.last
        if gap <= 0:
            if -gap > self.reset_after_gap:
                # The camera or a replayed bag restarted its clock: a new sequence, not a stale
                # frame (otherwise the gate would refuse every frame until time caught up).
                return Decision(STEP, t, age, True, 'time jumped back')
            return Decision(LATE, t, age)
        if self.respect_dt and gap < DT_TOLERANCE * self.dt:
            return Decision(SKIPPED, t, age)
        if gap > self.reset_after_gap:
            return Decision(STEP, t, age, True, 'gap')
        return Decision(STEP, t, age, every, 'every frame' if every else '')

    def stepped(self, t: float) -> None:
        """Record that the policy stepped on the frame of time ``t``."""
        self.last = t

    def too_old(self, t: float, now: float) -> bool:
        """True when the frame of time ``t`` is older than ``max_frame_age`` at ``now``.

        For the check after decoding: a frame fresh on arrival may be stale once decoded, and
        its command would then answer a scene that is gone.
        """
        return self.max_frame_age > 0 and now - t > self.max_frame_age


class SimClockWatch:
    """Says why a node on simulation time cannot date frames: no ``/clock`` yet, or a stalled one.

    Under ``use_sim_time`` the node's clock is the last ``/clock`` message: 0 before the first,
    frozen when the simulator stops publishing. Ages measured on it mean nothing (seen: with no
    ``/clock``, ``0 - stamp`` clamped to age 0 and an hour-old frame was stepped), so such frames
    are dropped as late until the clock runs. ``stall_after``: steady seconds without a new
    clock value that count as stalled (0: only the never-started clock is caught). Observed at
    frame arrival only, so a ``/clock`` slower than ``1 / stall_after`` Hz looks stalled.
    """

    def __init__(self, stall_after: float) -> None:
        _seconds('stall_after', stall_after, allow_zero=True)
        self.stall_after = float(stall_after)
        self._value: float | None = None
        self._changed_at = 0.0

    def problem(self, sim_now: float, steady_now: float) -> str | None:
        """Why the clock reading ``sim_now`` (s) cannot date a frame, or None when it can."""
        if sim_now <= 0:
            return 'simulation time is 0 (use_sim_time, no /clock received yet)'
        if sim_now != self._value:
            self._value, self._changed_at = sim_now, steady_now
            return None
        still = steady_now - self._changed_at
        if self.stall_after > 0 and still > self.stall_after:
            return f'simulation time has not moved for {still:.2f} s (/clock stalled)'
        return None


class SilenceWatch:
    """Says once, when no command was computed for ``limit`` seconds, that it is time to stop.

    Once per silence, not repeatedly: the motor driver's own watchdog stops the motors too, and
    a node that kept publishing zeros would fight any other source of cmd_vel (teleop). The next
    ``feed`` re-arms it. ``disarm`` is for when a stop was just published for another reason.
    """

    def __init__(self, limit: float) -> None:
        _seconds('stop_after', limit)
        self.limit = float(limit)
        self._last: float | None = None

    def feed(self, now: float) -> None:
        self._last = now

    def disarm(self) -> None:
        self._last = None

    def expired(self, now: float) -> bool:
        """True once per silence longer than ``limit``; False before the first ``feed``."""
        if self._last is None or now - self._last <= self.limit:
            return False
        self._last = None
        return True
