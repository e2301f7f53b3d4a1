"""Skid-steer kinematics of a simulated MaLPi, and the discrete actions the sim is driven with.

Two ways in, as on the real robot: wheel throttles in [-1, 1] (what a motor driver sets) or a
twist (linear m/s, angular rad/s, what ``cmd_vel`` carries). Both end in the same wheel model,
so actuation noise and limits apply to policy, expert and ROS path alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from malpi_ros.checks import non_negative, positive
from malpi_ros.config import Action, ActionTable
from malpi_ros.errors import ConfigError
from malpi_ros.runtime.motor import wheel_throttles

# Designed for one action per frame at 10 Hz (dt = 0.1 s): forward covers 3.5 cm a frame; a
# turn is a 0.25 m-radius arc that keeps moving forward (0.1 rad a frame), tight enough for the
# track's 0.4-0.5 m curves when mixed with forward, gentle enough that one wrong frame is
# recoverable. Names match the default policy table (MALPI_ACTIONS), so num_actions stays 5.
SIM_ACTIONS = (
    Action('stop', 0.0, 0.0),
    Action('forward', 0.35, 0.0),
    Action('left', 0.25, 1.0),
    Action('right', 0.25, -1.0),
    Action('backward', -0.2, 0.0),
)


def sim_action_table() -> ActionTable:
    """The action table of the simulator: the expert and the policy act through it alike."""
    return ActionTable(actions=SIM_ACTIONS, max_linear=0.35, max_angular=1.0)


class Pose(NamedTuple):
    """Robot pose on the floor: metres and radians (theta 0 = +x, counter-clockwise)."""

    x: float
    y: float
    theta: float


@dataclass(frozen=True)
class RobotConfig:
    """MaLPi-ish skid-steer: wheel spacing, top wheel speed, body limits, actuation noise.

    ``wheel_noise`` is the relative standard deviation of each wheel's speed per step (slip,
    uneven motors); 0 makes the kinematics exact and deterministic.
    """

    track_width: float = 0.14
    max_wheel_speed: float = 0.5
    max_linear: float = 0.5
    max_angular: float = 3.0
    wheel_noise: float = 0.03

    def __post_init__(self) -> None:
        positive('robot track_width', self.track_width)
        positive('robot max_wheel_speed', self.max_wheel_speed)
        positive('robot max_linear', self.max_linear)
        positive('robot max_angular', self.max_angular)
        non_negative('robot wheel_noise', self.wheel_noise)
        if self.wheel_noise > 0.5:
            raise ConfigError(f'robot wheel_noise must be <= 0.5, got {self.wheel_noise!r}')


def wheels_to_twist(left: float, right: float, config: RobotConfig) -> tuple[float, float]:
    """Wheel throttles -> (linear m/s, angular rad/s): throttles clipped to [-1, 1], the
    result to the body's ``max_linear`` / ``max_angular``."""
    vl = float(np.clip(left, -1.0, 1.0)) * config.max_wheel_speed
    vr = float(np.clip(right, -1.0, 1.0)) * config.max_wheel_speed
    return _body_twist(vl, vr, config)


def _body_twist(vl: float, vr: float, config: RobotConfig) -> tuple[float, float]:
    """Wheel speeds (m/s) -> the body's twist, within its limits."""
    linear = float(np.clip((vl + vr) / 2.0, -config.max_linear, config.max_linear))
    angular = (vr - vl) / config.track_width
    return linear, float(np.clip(angular, -config.max_angular, config.max_angular))


def twist_to_wheels(linear: float, angular: float, config: RobotConfig) -> tuple[float, float]:
    """(linear, angular) -> wheel throttles in [-1, 1].

    A twist beyond what the wheels can do is scaled down as a whole, so the arc's curvature
    (where the robot goes) is kept and only its speed drops.
    """
    return wheel_throttles(linear, angular, config.track_width, config.max_wheel_speed)


def integrate(pose: Pose, linear: float, angular: float, dt: float) -> Pose:
    """Move along the exact arc of a constant twist for ``dt`` seconds (no Euler drift)."""
    x, y, theta = pose
    if abs(angular) < 1e-9:
        x += linear * math.cos(theta) * dt
        y += linear * math.sin(theta) * dt
    else:
        radius = linear / angular
        x += radius * (math.sin(theta + angular * dt) - math.sin(theta))
        y -= radius * (math.cos(theta + angular * dt) - math.cos(theta))
    theta = math.atan2(math.sin(theta + angular * dt), math.cos(theta + angular * dt))
    return Pose(x, y, theta)


class Robot:
    """A skid-steer body: holds its pose, moves it per step, with seeded actuation noise."""

    def __init__(
        self,
        config: RobotConfig,
        pose: Pose | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.config = config
        self.pose = Pose(0.0, 0.0, 0.0) if pose is None else Pose(*pose)
        # No generator means no noise: exact kinematics whatever wheel_noise says.
        self._rng = rng
        self.last_twist = (0.0, 0.0)

    def step_wheels(self, left: float, right: float, dt: float) -> Pose:
        """Drive the wheels at these throttles for ``dt`` s; returns the new pose."""
        if not (math.isfinite(left) and math.isfinite(right)):
            raise ValueError(f'wheel throttles must be finite, got ({left!r}, {right!r})')
        if not dt > 0:
            raise ValueError(f'dt must be > 0, got {dt!r}')
        cfg = self.config
        vl = float(np.clip(left, -1.0, 1.0)) * cfg.max_wheel_speed
        vr = float(np.clip(right, -1.0, 1.0)) * cfg.max_wheel_speed
        if self._rng is not None and cfg.wheel_noise > 0:
            slip = self._rng.normal(0.0, cfg.wheel_noise, size=2)
            vl *= 1.0 + slip[0]
            vr *= 1.0 + slip[1]
        linear, angular = _body_twist(vl, vr, cfg)
        self.last_twist = (linear, angular)
        self.pose = integrate(self.pose, linear, angular, dt)
        return self.pose

    def step_twist(self, linear: float, angular: float, dt: float) -> Pose:
        """Drive at a commanded twist (as ``cmd_vel`` would) for ``dt`` s."""
        left, right = twist_to_wheels(linear, angular, self.config)
        return self.step_wheels(left, right, dt)
