"""Which input drives the motors: a teleop takeover over the policy, and the stop under both.

``motor_driver_node`` has two inputs: the policy's ``cmd_vel`` and a person's
``teleop/cmd_vel`` (keyboard, joystick, the simulator's supervisor). The rule, pure and tested
with fake times (DESIGN §5, §7), is what ``twist_mux`` does with two priorities:

- teleop wins while its last command is younger than ``teleop_timeout``: a person who keeps
  sending commands (a joystick publishes at a rate while its dead-man button is held) has the
  wheels, and a zero Twist from them is a stop they asked for, not a hand-back;
- otherwise the policy's last command drives while it is younger than ``cmd_timeout``: control
  returns to the policy as soon as the teleop stream goes stale, with the policy's newest
  command (it kept publishing during the takeover), never with one it sent before;
- otherwise the motors stop: no fresh input, whatever the sources were.

``Arbiter.select`` is asked at every command and at every watchdog tick, so a hand-back or a
stop comes at most one tick after the timeout.

``OverrideWatch`` is the policy's side: from the driver's ``~/applied`` it tells whether the
policy's commands are overridden now (each step's ``PolicyOutput.overridden``) and when a
takeover ended (the hand-back, where ``policy_node`` may reset its LSTM state).
"""

from __future__ import annotations

from dataclasses import dataclass

from malpi_ros.checks import positive
from malpi_ros.runtime.motor import Watchdog

# The source codes of ``malpi_ros/msg/AppliedCommand`` (index = code): add, never reorder.
STOP, POLICY, TELEOP = 'stop', 'policy', 'teleop'
SOURCES = (STOP, POLICY, TELEOP)


@dataclass(frozen=True)
class Velocity:
    """A body velocity command: ``linear`` (m/s, x forward) and ``angular`` (rad/s, z)."""

    linear: float = 0.0
    angular: float = 0.0


@dataclass(frozen=True)
class Selection:
    """What the driver should apply now: the command and the input it came from."""

    source: str
    command: Velocity

    @property
    def code(self) -> int:
        """The source as the message's code (``SOURCES`` index)."""
        return SOURCES.index(self.source)


STOPPED = Selection(STOP, Velocity())


class Arbiter:
    """Teleop over policy over stop, each input fresh within its own timeout.

    Times are passed in (``time.monotonic()`` in the node), so the rule is tested without a
    clock. Not thread-safe: the driver calls it from one executor thread.
    """

    def __init__(self, cmd_timeout: float, teleop_timeout: float) -> None:
        positive('cmd_timeout', cmd_timeout)
        positive('teleop_timeout', teleop_timeout)
        self._policy = Watchdog(cmd_timeout)
        self._teleop = Watchdog(teleop_timeout)
        self._commands = {POLICY: Velocity(), TELEOP: Velocity()}
        self._last: Selection = STOPPED

    def feed(self, source: str, now: float, command: Velocity) -> None:
        """A command arrived from ``source`` (POLICY or TELEOP) at ``now``."""
        if source not in self._commands:
            raise ValueError(f'source must be {POLICY!r} or {TELEOP!r}, got {source!r}')
        (self._teleop if source == TELEOP else self._policy).feed(now)
        self._commands[source] = command

    def select(self, now: float) -> Selection:
        """The command that should drive at ``now``; also remembered for ``changed``."""
        if not self._teleop.expired(now):
            chosen = Selection(TELEOP, self._commands[TELEOP])
        elif not self._policy.expired(now):
            chosen = Selection(POLICY, self._commands[POLICY])
        else:
            chosen = STOPPED
        self._last = chosen
        return chosen

    @property
    def last(self) -> Selection:
        """The selection of the last ``select`` call (STOPPED before the first)."""
        return self._last

    def fed_at(self, source: str) -> float | None:
        """When ``source`` last sent a command (None before its first, and for STOP)."""
        if source == STOP:
            return None
        return (self._teleop if source == TELEOP else self._policy).last_feed

    def last_input(self) -> tuple[str, float] | None:
        """The newest input (source, time), None before any: what a stop log measures from."""
        fed = [(when, src) for src in (POLICY, TELEOP) if (when := self.fed_at(src)) is not None]
        if not fed:
            return None
        when, source = max(fed)
        return source, when


class OverrideWatch:
    """Whether a teleop takeover overrides the policy now, from the driver's ``~/applied``.

    The driver reports at every change and at a fixed rate (10 Hz by default); a report older
    than ``stale_after`` says nothing (a driver that died mid-takeover does not flag the rest of
    the drive). Times are passed in; not thread-safe (the node guards it with a lock).
    """

    def __init__(self, stale_after: float) -> None:
        positive('stale_after', stale_after)
        self.stale_after = float(stale_after)
        self._source: str | None = None
        self._at = 0.0
        self.takeovers = 0

    def applied(self, source: str, now: float) -> bool:
        """Note one report; True when it ends a takeover (teleop, then another source)."""
        ended = self._source == TELEOP and source != TELEOP
        if source == TELEOP and self._source != TELEOP:
            self.takeovers += 1
        self._source, self._at = source, now
        return ended

    def overridden(self, now: float) -> bool:
        return self._source == TELEOP and now - self._at <= self.stale_after
