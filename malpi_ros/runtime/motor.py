"""Skid-steer motor control without ROS: mixing, the command watchdog and the motor backends.

The safety logic lives here (DESIGN §5, §7) so it is tested with plain function calls and fake
times; ``motor_driver_node`` only wires it to ``cmd_vel`` and a timer.

- ``mix`` turns a body velocity (m/s, rad/s) into two wheel throttles in [-1, 1]: clamped to the
  configured limits, scaled down together when a wheel would saturate (so the robot still turns
  on the commanded radius, only slower), zero inside the motors' stall deadband.
- ``Watchdog`` says when the last command is too old to keep driving on.
- Backends: ``MotorKitBackend`` (the Adafruit DC & Stepper Motor HAT of the MaLPi) and
  ``SimBackend`` (remembers the throttles and reports them, for tests and the simulator).
  ``drive`` and ``halt`` are how callers talk to any backend: a failing backend is stopped and
  the failure surfaces as ``MotorError``, never as a silently running motor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from malpi_ros.checks import positive
from malpi_ros.errors import ConfigError, MotorError

BACKENDS = ('motorkit', 'sim')
MOTORKIT_PIP = 'adafruit-circuitpython-motorkit'


@dataclass(frozen=True)
class MotorConfig:
    """Geometry and limits of the skid-steer base, and how its motors are wired.

    ``max_wheel_speed`` is the ground speed of a wheel at throttle 1.0 (m/s); ``deadband`` is the
    throttle magnitude below which a motor only stalls and heats up, so it is sent 0 instead.
    ``cmd_timeout`` (s): with no newer command the motors stop. ``invert_*`` flip a motor that
    is wired backwards; ``*_channel`` are the HAT's motor terminals M1..M4.
    """

    track_width: float = 0.15
    max_wheel_speed: float = 0.5
    max_linear: float = 0.3
    max_angular: float = 2.0
    deadband: float = 0.1
    cmd_timeout: float = 0.5
    invert_left: bool = False
    invert_right: bool = False
    left_channel: int = 1
    right_channel: int = 2

    def __post_init__(self) -> None:
        for name in ('track_width', 'max_wheel_speed', 'max_linear', 'max_angular'):
            positive(name, getattr(self, name))
        positive('cmd_timeout', self.cmd_timeout)
        if isinstance(self.deadband, bool) or not (
            isinstance(self.deadband, int | float) and 0.0 <= self.deadband < 1.0
        ):
            raise ConfigError(f'deadband must be a throttle in [0, 1), got {self.deadband!r}')
        for name in ('invert_left', 'invert_right'):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f'{name} must be true or false, got {getattr(self, name)!r}')
        for name in ('left_channel', 'right_channel'):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4:
                raise ConfigError(f'{name} must be a motor channel 1..4, got {value!r}')
        if self.left_channel == self.right_channel:
            raise ConfigError(
                f'left_channel and right_channel must differ, both are {self.left_channel}'
            )


def _clamp(value: float, limit: float) -> float:
    return max(-limit, min(limit, value))


def wheel_throttles(
    linear: float, angular: float, track_width: float, max_wheel_speed: float
) -> tuple[float, float]:
    """Skid-steer kinematics: (left, right) throttles in [-1, 1] for a body velocity.

    Saturation scales both wheels by the same factor: clipping only the faster wheel would
    change the turn radius, and the policy's actions are learned as radii, not wheel speeds.
    The motor driver and the simulator both use this, so they move the robot alike.
    """
    half = angular * track_width / 2.0
    left = (linear - half) / max_wheel_speed
    right = (linear + half) / max_wheel_speed
    peak = max(abs(left), abs(right))
    if peak > 1.0:
        left, right = left / peak, right / peak
    return left, right


def clamp_command(linear_x: float, angular_z: float, cfg: MotorConfig) -> tuple[float, float]:
    """The body command the driver executes: clamped to the limits; non-finite is a stop.

    What ``~/applied`` reports as the command, so a recording is labelled with what moved the
    robot, not with what was asked for.
    """
    if not (math.isfinite(linear_x) and math.isfinite(angular_z)):
        return 0.0, 0.0
    return _clamp(float(linear_x), cfg.max_linear), _clamp(float(angular_z), cfg.max_angular)


def mix(linear_x: float, angular_z: float, cfg: MotorConfig) -> tuple[float, float]:
    """The driver's command: clamped to the limits, ``wheel_throttles``, deadband, wiring.

    A non-finite command is a stop.
    """
    v, w = clamp_command(linear_x, angular_z, cfg)
    left, right = wheel_throttles(v, w, cfg.track_width, cfg.max_wheel_speed)
    left = 0.0 if abs(left) < cfg.deadband else left
    right = 0.0 if abs(right) < cfg.deadband else right
    if cfg.invert_left:
        left = -left
    if cfg.invert_right:
        right = -right
    # + 0.0 turns a -0.0 (from an inverted zero) into 0.0, so a stop always reads [0, 0].
    return left + 0.0, right + 0.0


class Watchdog:
    """Expires when no ``feed`` came for ``timeout`` seconds; expired until the first feed.

    Times are passed in (any monotonic clock), so the logic is tested with fake times.
    """

    def __init__(self, timeout: float) -> None:
        positive('watchdog timeout', timeout)
        self.timeout = float(timeout)
        self._last: float | None = None

    @property
    def last_feed(self) -> float | None:
        """The time of the last feed, None before the first."""
        return self._last

    def feed(self, now: float) -> None:
        self._last = now

    def expired(self, now: float) -> bool:
        return self._last is None or now - self._last >= self.timeout


class MotorBackend(Protocol):
    """What the driver needs of a motor controller: two throttles, a stop, a release."""

    def set_throttles(self, left: float, right: float) -> None: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


class SimBackend:
    """Drives nothing: remembers the last throttles and reports each one to ``on_apply``.

    The node passes a callback that publishes the throttles, which makes the driver observable
    from tests and the simulator; stops are reported too, as (0, 0).
    """

    def __init__(self, on_apply: Callable[[float, float], None] | None = None) -> None:
        self.on_apply = on_apply
        self.throttles: tuple[float, float] = (0.0, 0.0)
        self.applied = 0
        self.closed = False

    def set_throttles(self, left: float, right: float) -> None:
        self.throttles = (float(left), float(right))
        self.applied += 1
        if self.on_apply is not None:
            self.on_apply(*self.throttles)

    def stop(self) -> None:
        self.set_throttles(0.0, 0.0)

    def close(self) -> None:
        self.closed = True


class MotorKitBackend:
    """The Adafruit DC & Stepper Motor HAT (PCA9685 over I2C) through ``adafruit_motorkit``.

    The library is imported here, not at module top, so that training machines and tests never
    need it. ``stop`` sets throttle 0 (the library brakes); ``close`` releases the motors
    (throttle None) so nothing stays energized after the driver exits.
    """

    def __init__(self, cfg: MotorConfig) -> None:
        try:
            from adafruit_motorkit import MotorKit
        except ImportError as err:
            raise MotorError(
                f'the motorkit backend needs the Adafruit MotorKit library ({err}); install it '
                f'with `pip install {MOTORKIT_PIP}`, or run with backend:=sim'
            ) from err
        try:
            kit = MotorKit()
            self._left: Any = getattr(kit, f'motor{cfg.left_channel}')
            self._right: Any = getattr(kit, f'motor{cfg.right_channel}')
        except Exception as err:  # I2C/board errors come in many types; name the cause.
            raise MotorError(f'cannot open the Motor HAT: {type(err).__name__}: {err}') from err

    def set_throttles(self, left: float, right: float) -> None:
        self._left.throttle = left
        self._right.throttle = right

    def stop(self) -> None:
        self.set_throttles(0.0, 0.0)

    def close(self) -> None:
        self._left.throttle = None
        self._right.throttle = None


def make_backend(
    name: str, cfg: MotorConfig, on_apply: Callable[[float, float], None] | None = None
) -> MotorBackend:
    """The backend called ``name`` ('motorkit' or 'sim'); ``on_apply`` is used by 'sim' only."""
    if name == 'sim':
        return SimBackend(on_apply)
    if name == 'motorkit':
        return MotorKitBackend(cfg)
    raise ConfigError(f'backend must be one of {", ".join(BACKENDS)}, got {name!r}')


def halt(backend: MotorBackend) -> None:
    """Stop the motors; a failure becomes MotorError (the caller retries on its next tick)."""
    try:
        backend.stop()
    except Exception as err:
        raise MotorError(f'stopping the motors failed: {type(err).__name__}: {err}') from err


def drive(backend: MotorBackend, left: float, right: float) -> None:
    """Apply throttles; if the backend fails, try to stop it and raise MotorError.

    A backend that half-applied a command must not be left running on it: the stop is
    attempted before the error is reported, and a failed stop is named in the message too.
    """
    try:
        backend.set_throttles(left, right)
    except Exception as err:
        stopped = 'motors stopped'
        try:
            backend.stop()
        except Exception as stop_err:
            stopped = f'stopping failed too: {type(stop_err).__name__}: {stop_err}'
        raise MotorError(
            f'setting throttles ({left:.3f}, {right:.3f}) failed: {type(err).__name__}: {err}; '
            f'{stopped}'
        ) from err
