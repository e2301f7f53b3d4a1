"""The simulated MaLPi world: track, robot, camera and the bookkeeping a demo is judged by.

Example:
    world = SimWorld(SimConfig(), seed=3)
    for _ in range(1000):
        frame = world.render()                 # what the policy sees (RGB uint8)
        world.step(world.expert_action())      # or the policy's action index
    print(world.laps, world.off_track_events, world.fork_decisions)

Time is simulated: ``step`` advances ``dt`` seconds (0.1 s, one frame at 10 Hz, by default)
without waiting, so thousands of frames take seconds. Everything random (the cue of each lap,
the light, pixel noise, wheel slip, the start pose) comes from generators seeded by ``seed``:
the same seed and the same calls give the same frames and poses.

Off-track: when the robot's centre is farther than ``off_track_margin`` from every tape
centreline an off-track event is counted (once per excursion). With ``reset_on_off_track``
(the default) the robot is put back on the nearest tape point, facing along it, so a closed-loop
run goes on; without it the robot stays where it is until it finds the tape again.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from malpi_ros.checks import int_at_least, non_negative
from malpi_ros.config import ActionTable, from_dict
from malpi_ros.errors import ConfigError
from malpi_ros.sim.camera import Camera, CameraConfig, Lighting, draw_lighting
from malpi_ros.sim.expert import Expert, ExpertConfig
from malpi_ros.sim.robot import Pose, Robot, RobotConfig, sim_action_table
from malpi_ros.sim.track import CUE_BRANCH, CUES, TrackConfig, get_track

_NESTED = {
    'track': TrackConfig,
    'camera': CameraConfig,
    'robot': RobotConfig,
    'expert': ExpertConfig,
    'actions': ActionTable,
}


@dataclass(frozen=True)
class SimConfig:
    """Everything that fixes a simulated run; nested configs may be given as dicts.

    ``start_jitter`` / ``start_heading_jitter``: std of the start pose's lateral offset (m)
    and heading (rad), so episodes of different seeds do not all begin identically.
    """

    track: TrackConfig = field(default_factory=TrackConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    robot: RobotConfig = field(default_factory=RobotConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    actions: ActionTable = field(default_factory=sim_action_table)
    dt: float = 0.1
    seed: int = 0
    reset_on_off_track: bool = True
    start_jitter: float = 0.02
    start_heading_jitter: float = 0.05

    def __post_init__(self) -> None:
        for name, cls in _NESTED.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, from_dict(cls, value))
            elif not isinstance(value, cls):
                raise ConfigError(
                    f'sim {name} must be a {cls.__name__} or a dict, got {type(value).__name__}'
                )
        if not (isinstance(self.dt, int | float) and 0.0 < self.dt <= 1.0):
            raise ConfigError(f'sim dt must be in (0, 1] seconds, got {self.dt!r}')
        int_at_least('sim seed', self.seed, 0)
        if not isinstance(self.reset_on_off_track, bool):
            raise ConfigError(
                f'sim reset_on_off_track must be true or false, got {self.reset_on_off_track!r}'
            )
        non_negative('sim start_jitter', self.start_jitter)
        non_negative('sim start_heading_jitter', self.start_heading_jitter)
        if self.start_jitter >= self.track.off_track_margin:
            raise ConfigError(
                f'sim start_jitter ({self.start_jitter}) must be below the track '
                f'off_track_margin ({self.track.off_track_margin})'
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimConfig:
        """From a plain dict (YAML, JSON), nested sections included; unknown keys are errors."""
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ForkDecision(NamedTuple):
    """What happened at one fork: the lap's cue, the branch driven, and whether they agree."""

    lap: int
    cue: str
    branch: str  # 'left', 'right', or 'none' (off the tape when passing mid-fork)
    correct: bool
    time: float


class WorldStep(NamedTuple):
    """What one step did, for loops that react to events."""

    pose: Pose
    off_track: bool  # off the tape now (always False after a respawn)
    off_track_event: bool  # this step left the tape
    respawned: bool  # this step put the robot back on the tape
    lap_completed: bool  # this step crossed the start line forward into a new lap
    decision: ForkDecision | None  # this step passed mid-fork


class SimWorld:
    """A seeded simulated run: ``reset``, ``step``, ``render`` and progress bookkeeping.

    ``reset()`` starts a new episode and keeps drawing from the running generators (a new
    episode each time); ``reset(seed)`` reseeds them first (the same episode for the same seed).
    """

    def __init__(self, config: SimConfig | None = None, seed: int | None = None) -> None:
        self.config = config or SimConfig()
        self.track = get_track(self.config.track)
        self.camera = Camera(self.config.camera, self.track)
        self.actions = self.config.actions
        self._expert: Expert | None = None
        self.reset(self.config.seed if seed is None else seed)

    # --- episode -----------------------------------------------------------------------------

    def reset(self, seed: int | None = None) -> Pose:
        """Start at the start line (mid top straight), lap 0, counters zeroed."""
        if seed is not None:
            int_at_least('seed', seed, 0)
            self.seed = seed
            streams = np.random.SeedSequence(seed).spawn(5)
            self._cue_rng, self._light_rng, self._noise_rng, motion, self._start_rng = (
                np.random.default_rng(s) for s in streams
            )
            self._motion_rng = motion
        cfg = self.config
        start = self.track.pose_at(0.0)
        lateral = self._start_rng.normal(0.0, cfg.start_jitter) if cfg.start_jitter else 0.0
        heading = (
            self._start_rng.normal(0.0, cfg.start_heading_jitter)
            if cfg.start_heading_jitter
            else 0.0
        )
        pose = Pose(
            start.x - lateral * math.sin(start.theta),
            start.y + lateral * math.cos(start.theta),
            start.theta + heading,
        )
        self.robot = Robot(cfg.robot, pose, self._motion_rng)
        self.steps = 0
        self.time = 0.0
        self.distance = 0.0
        self.laps = 0
        self.off_track = False
        self.off_track_events = 0
        # Of them, those that began in the fork (trunk s from its start to its end): where a
        # policy that has seen one branch, or not learned the cue, leaves the tape.
        self.off_track_at_fork = 0
        self.fork_decisions: list[ForkDecision] = []
        near = self.track.nearest(pose.x, pose.y)
        self._s = near.s
        # Unwrapped metres along the loop since the start line; a lap is one track length.
        self.progress = near.s if near.s < self.track.length / 2 else near.s - self.track.length
        self._decided_lap = -1
        self._start_lap()
        return self.pose

    def _start_lap(self) -> None:
        self.cue = CUES[int(self._cue_rng.integers(len(CUES)))]
        self.lighting: Lighting = draw_lighting(self.config.camera, self._light_rng)

    # --- state ---------------------------------------------------------------------------------

    @property
    def pose(self) -> Pose:
        return self.robot.pose

    @property
    def target_branch(self) -> str:
        """The branch this lap's cue asks for."""
        return CUE_BRANCH[self.cue]

    @property
    def lap_s(self) -> float:
        """Position along the loop, metres from the start line, in [0, track length)."""
        return self._s

    def summary(self) -> dict[str, Any]:
        """Progress counters as plain values (for logs and JSON)."""
        correct = sum(d.correct for d in self.fork_decisions)
        return {
            'steps': self.steps,
            'time': round(self.time, 3),
            'distance': round(self.distance, 3),
            'laps': self.laps,
            'off_track_events': self.off_track_events,
            'off_track_at_fork': self.off_track_at_fork,
            'forks': len(self.fork_decisions),
            'forks_correct': correct,
        }

    # --- acting -------------------------------------------------------------------------------

    def step(self, action: int | tuple[float, float], dt: float | None = None) -> WorldStep:
        """Apply an action index (from ``config.actions``) or (left, right) wheel throttles."""
        dt = self.config.dt if dt is None else dt
        if isinstance(action, int | np.integer) and not isinstance(action, bool):
            if not 0 <= int(action) < len(self.actions):
                raise ValueError(
                    f'action index must be in [0, {len(self.actions)}) '
                    f'({", ".join(self.actions.names)}), got {action!r}'
                )
            a = self.actions.actions[int(action)]
            self.robot.step_twist(a.linear_x, a.angular_z, dt)
        elif isinstance(action, tuple | list | np.ndarray) and len(action) == 2:
            self.robot.step_wheels(float(action[0]), float(action[1]), dt)
        else:
            raise ValueError(
                f'action must be an action index or (left, right) throttles, got {action!r}'
            )
        return self._after_motion(dt)

    def step_twist(self, linear: float, angular: float, dt: float | None = None) -> WorldStep:
        """Apply a commanded twist (m/s, rad/s), as the ROS path's ``cmd_vel`` does."""
        dt = self.config.dt if dt is None else dt
        self.robot.step_twist(linear, angular, dt)
        return self._after_motion(dt)

    def _after_motion(self, dt: float) -> WorldStep:
        track, length = self.track, self.track.length
        self.steps += 1
        self.time += dt
        self.distance += abs(self.robot.last_twist[0]) * dt
        pose = self.robot.pose
        near = track.nearest(pose.x, pose.y)
        # Nearest-point progress, unwrapped: a step moves far less than half a lap.
        self.progress += (near.s - self._s + length / 2) % length - length / 2
        self._s = near.s

        lap_completed = False
        lap_now = math.floor(self.progress / length)
        if lap_now > self.laps:  # forward over the start line into a lap not seen before
            self.laps = lap_now
            lap_completed = True
            self._start_lap()

        off = near.distance > self.config.track.off_track_margin
        decision = None
        if (
            lap_now == self.laps
            and self._decided_lap < lap_now
            and self.progress - lap_now * length >= track.decide_s
        ):
            branch = 'none' if off else ('left' if near.lateral > 0 else 'right')
            decision = ForkDecision(
                lap_now, self.cue, branch, branch == self.target_branch, self.time
            )
            self.fork_decisions.append(decision)
            self._decided_lap = lap_now

        event = off and not self.off_track
        if event:
            self.off_track_events += 1
            self.off_track_at_fork += track.fork_start <= near.s <= track.fork_end
        respawned = False
        if off and self.config.reset_on_off_track:
            self.robot.pose = track.pose_at(near.s, near.route)
            off, respawned = False, True
        self.off_track = off
        return WorldStep(self.robot.pose, off, event, respawned, lap_completed, decision)

    def expert_action(self) -> int:
        """What the expert would do now (it knows this lap's branch; the policy does not)."""
        if self._expert is None:
            self._expert = Expert(self.track, self.actions, self.config.expert)
        return self._expert.act(self.pose, self.target_branch)

    # --- seeing --------------------------------------------------------------------------------

    def render(self) -> np.ndarray:
        """The camera frame at the current pose: RGB uint8, (height, width, 3)."""
        return self.camera.render(self.pose, self.cue, self.lighting, self._noise_rng)
