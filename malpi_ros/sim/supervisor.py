"""The simulated person of HG-DAgger: watches the robot, takes over only when it strays.

The expert (``sim.expert``) drives every frame; the supervisor lets the *policy* drive and
steps in only when the robot leaves the expert's tolerance around this lap's route (the cued
branch's centreline): then it drives with the expert's actions until the robot is well back,
and lets go. Its commands go out as ``teleop/cmd_vel`` (``sim_node`` with ``supervisor:=true``)
and win in ``motor_driver_node`` like a joystick's, so an intervention run exercises the same
graph, recordings and labels as a person with a real teleop.

Thresholds (``SupervisorConfig``), with hysteresis so that it neither flickers on the edge nor
lets go of a robot that is about to leave again:

- take over when the robot is more than ``take_over_distance`` (0.07 m) from the route's
  centreline, or its heading is more than ``take_over_heading`` (0.6 rad, ~34 deg) off the
  route's. The tape is 8 cm wide and the sim calls a robot off-track at 15 cm: 7 cm is when
  the robot's centre has left the tape, half way to an off-track event, so the supervisor can
  still bring it back; 0.6 rad is a heading that reaches the off-track margin within ~0.7 s at
  0.35 m/s. The expert itself stays within ~4.5 cm on straights (its steering threshold).
  Being on the other branch of the fork than the cue asks for is far off the route: a takeover.
- let go when the robot is within ``release_distance`` (0.03 m) and ``release_heading``
  (0.2 rad) of the route, and has been driven for at least ``min_hold`` frames (3, 0.3 s at 10
  Hz: a takeover shorter than the driver's ``teleop_timeout`` would blur into the next one).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from malpi_ros.checks import int_at_least, positive
from malpi_ros.errors import ConfigError
from malpi_ros.sim.expert import Expert
from malpi_ros.sim.robot import Pose
from malpi_ros.sim.track import Track
from malpi_ros.sim.world import SimConfig, SimWorld


@dataclass(frozen=True)
class SupervisorConfig:
    """When the simulated person takes over and lets go (see the module doc for why)."""

    take_over_distance: float = 0.07
    take_over_heading: float = 0.6
    release_distance: float = 0.03
    release_heading: float = 0.2
    min_hold: int = 3

    def __post_init__(self) -> None:
        for name in ('take_over_distance', 'take_over_heading', 'release_distance'):
            positive(f'supervisor {name}', getattr(self, name))
        positive('supervisor release_heading', self.release_heading)
        int_at_least('supervisor min_hold', self.min_hold, 1)
        if self.release_distance >= self.take_over_distance:
            raise ConfigError(
                f'supervisor release_distance ({self.release_distance}) must be below '
                f'take_over_distance ({self.take_over_distance})'
            )
        if self.release_heading >= self.take_over_heading:
            raise ConfigError(
                f'supervisor release_heading ({self.release_heading}) must be below '
                f'take_over_heading ({self.take_over_heading})'
            )


def route_error(track: Track, pose: Pose, branch: str) -> tuple[float, float]:
    """(distance m, |heading error| rad) of ``pose`` from ``branch``'s route centreline."""
    route = track.routes[branch]
    d2 = (route[:, 0] - pose.x) ** 2 + (route[:, 1] - pose.y) ** 2
    i = int(np.argmin(d2))
    heading = float(track.route_headings[branch][i])
    error = (pose.theta - heading + math.pi) % (2 * math.pi) - math.pi
    return math.sqrt(float(d2[i])), abs(error)


class Supervisor:
    """One decision per frame: None (the policy drives) or the expert's action index."""

    def __init__(self, expert: Expert, config: SupervisorConfig | None = None) -> None:
        self.expert = expert
        self.config = config or SupervisorConfig()
        self.active = False
        self.takeovers = 0
        self._held = 0

    def reset(self) -> None:
        """A new run: not driving, no takeovers counted."""
        self.active = False
        self.takeovers = 0
        self._held = 0

    def gate(self, distance: float, heading_error: float) -> bool:
        """Whether the supervisor drives this frame, from the robot's route error."""
        c = self.config
        if not self.active:
            if distance > c.take_over_distance or heading_error > c.take_over_heading:
                self.active = True
                self.takeovers += 1
                self._held = 0
        elif (
            self._held >= c.min_hold
            and distance < c.release_distance
            and heading_error < c.release_heading
        ):
            self.active = False
        if self.active:
            self._held += 1
        return self.active

    def act(self, pose: Pose, branch: str) -> int | None:
        """The expert's action while taking over, None while the policy may drive."""
        distance, heading = route_error(self.expert.track, pose, branch)
        return self.expert.act(pose, branch) if self.gate(distance, heading) else None


# (frame, the policy's action, the applied action, whether a takeover applied it)
OnFrame = Callable[[np.ndarray, int, int, bool], None]


def drive_supervised(
    bundle: Path,
    laps: int,
    seed: int,
    *,
    reset_on_handback: bool = False,
    linger: int = 3,
    sim: SimConfig | None = None,
    supervisor_config: SupervisorConfig | None = None,
    on_frame: OnFrame | None = None,
) -> dict[str, Any]:
    """A bundle's policy drives ``laps`` laps in this process with the supervisor watching.

    The closed loop of ``sim_node`` + ``policy_node`` + ``motor_driver_node`` without ROS, as
    ``demo.drive_offline``: every frame the policy steps (also during a takeover: its state
    stays current), the supervisor decides, and the world moves under the supervisor's action
    or the policy's. After the supervisor lets go its last action is held ``linger`` more
    frames, as the driver holds a teleop command for ``teleop_timeout`` (0.3 s = 3 frames at
    10 Hz). With ``reset_on_handback`` the policy's state is zeroed when control returns (the
    policy_node parameter). ``on_frame(frame, requested, applied, overridden)`` sees every
    frame before the world moves, with the policy's action, the one applied and whether a
    takeover applied it (sim action indices): the recorder of the DAgger rounds
    (``sim.record.record_supervised``). Returns ``SimWorld.summary()`` plus ``takeovers`` and
    ``takeover_frames``.
    """
    from malpi_ros.runtime.policy import Policy  # LiteRT only: no TensorFlow in this process

    policy = Policy.from_bundle(bundle, 'litert', num_threads=1)
    world = SimWorld(sim or SimConfig(), seed=seed)
    supervisor = Supervisor(
        Expert(world.track, world.actions, world.config.expert), supervisor_config
    )
    names = world.actions.names
    missing = [n for n in policy.config.actions.names if n not in names]
    if missing:
        raise ConfigError(f'bundle {bundle} has actions {missing} the simulator does not know')
    to_sim = [names.index(n) for n in policy.config.actions.names]
    held, left, taken, overriding = 0, 0, 0, False
    for _ in range(math.ceil(laps * 120.0 / world.config.dt)):  # 120 s a lap at the most
        if world.laps >= laps:
            break
        frame = world.render()
        chosen = to_sim[policy.step(frame).action]
        action = supervisor.act(world.pose, world.target_branch)
        if action is not None:
            held, left = action, linger
        elif left > 0:
            action, left = held, left - 1
        if overriding and action is None and reset_on_handback:
            policy.reset()  # control is back: zeroed before the next step, as policy_node does
        overriding = action is not None
        taken += overriding
        applied = chosen if action is None else action
        if on_frame is not None:
            on_frame(frame, chosen, applied, overriding)
        world.step(applied)
    return {**world.summary(), 'takeovers': supervisor.takeovers, 'takeover_frames': taken}
