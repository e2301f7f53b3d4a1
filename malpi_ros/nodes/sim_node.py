"""sim_node: the simulated MaLPi on the ROS graph - a camera that publishes, wheels that obey.

Example (the motor driver's sim backend drives it):
    sim_node --ros-args -p seed:=3 -r wheels:=/motor_driver_node/wheels

Each tick of a timer (``rate`` Hz of sim time, ``time_scale`` sim seconds per wall second) the
world moves ``1 / rate`` s of sim time under the latest command, then the camera frame of the
new pose is published. A command therefore acts during the period after the frame it answers,
as when the expert's driving was recorded (``malpi_ros.sim.record``). The timers run on the
steady clock (the pace is set in wall seconds), so ``use_sim_time`` does not freeze the
simulator; frames are stamped with the node's clock.

Topics (relative names, remapped in launch files):
- ``camera/image_raw`` (sensor_msgs/Image rgb8, sensor-data QoS: best effort, keep last 1, as a
  camera driver offers) stamped with the node's clock when published;
- in: ``wheels`` (std_msgs/Float32MultiArray ``[left, right]`` throttles, what
  ``motor_driver_node``'s sim backend publishes on ``~/wheels``) with ``input:=wheels``, or
  ``cmd_vel`` (geometry_msgs/Twist, applied through the sim robot's own mixing) with
  ``input:=cmd_vel``. A command older than ``input_timeout`` wall seconds counts as stop: the
  simulated robot does not run on when its driver dies;
- ``~/pose`` (geometry_msgs/PoseStamped, frame ``pose_frame_id``): the ground-truth pose, every
  tick;
- ``~/progress`` (std_msgs/String holding one JSON object): the bookkeeping a run is judged by,
  every ``progress_period`` wall seconds and at once on every lap, fork decision, off-track
  event and reset. JSON, not a diagnostic array, because its consumers (the demo, tests,
  ``ros2 topic echo``) want lists - fork decisions, lap times, off-track positions - that
  DiagnosticStatus key/value strings would flatten. Keys: see ``progress_report``.
- out, with ``supervisor:=true``: ``teleop/cmd_vel`` (geometry_msgs/Twist) - the simulated
  person of the DAgger rounds (``sim.supervisor``): after each tick, when the robot has left
  the expert's tolerance around this lap's route, the expert's action as a Twist, until the
  robot is back; nothing while the policy may drive. It reaches ``motor_driver_node``'s
  ``teleop/cmd_vel`` like a joystick's, so takeovers are arbitrated, applied and recorded as
  on a robot. Progress reports count its ``takeovers``.
- service ``~/reset`` (std_srvs/Trigger): back to the start line with counters zeroed, the world
  reseeded with ``seed`` (the same cue sequence as at start-up, so runs compare lap for lap).

With ``start_on_command`` (the default) sim time stands still - the start pose is published
frame after frame - until the first command that moves the robot arrives (a zero command, such
as the motor driver's stop at start-up, does not count): a run's clock, laps and mean speed do
not depend on how long the policy took to load. ``~/reset`` waits again.

With ``progress_file`` set, every ``~/progress`` message is also written to that file
(atomically: write beside, then rename), so a process without rclpy (``malpi_ros.sim.demo``) can
follow a run. SIGINT and SIGTERM end the node with exit code 0, after a last progress report.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rclpy
from geometry_msgs.msg import PoseStamped, Twist
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import Float32MultiArray, String
from std_srvs.srv import Trigger

from malpi_ros.checks import int_at_least, positive
from malpi_ros.errors import ConfigError
from malpi_ros.nodes.params import ParamSpec
from malpi_ros.nodes.runner import declare_parameters, freeze_use_sim_time, run_node, steady_timer
from malpi_ros.runtime.image import encode_image_fields
from malpi_ros.sim.camera import CameraConfig
from malpi_ros.sim.expert import Expert
from malpi_ros.sim.robot import Pose, RobotConfig
from malpi_ros.sim.supervisor import Supervisor
from malpi_ros.sim.world import SimConfig, SimWorld, WorldStep

NODE_NAME = 'sim_node'
INPUTS = ('wheels', 'cmd_vel')
MAX_OFF_TRACK_MARKS = 200  # positions of off-track events kept in the progress report


# --- pure parts (no rclpy types): tested without a graph ----------------------------------------


@dataclass(frozen=True)
class SimNodeConfig:
    """The node's parameters, checked once at start-up."""

    rate: float = 10.0
    time_scale: float = 1.0
    input: str = 'wheels'
    input_timeout: float = 0.5
    seed: int = 0
    width: int = 160
    height: int = 120
    track_width: float = 0.14
    max_wheel_speed: float = 0.5
    wheel_noise: float = 0.03
    reset_on_off_track: bool = True
    frame_id: str = 'camera'
    pose_frame_id: str = 'map'
    progress_period: float = 1.0
    progress_file: str = ''
    start_on_command: bool = True
    supervisor: bool = False

    def __post_init__(self) -> None:
        positive('rate', self.rate)
        positive('time_scale', self.time_scale)
        if self.input not in INPUTS:
            raise ConfigError(f'input must be one of {", ".join(INPUTS)}, got {self.input!r}')
        positive('input_timeout', self.input_timeout)
        int_at_least('seed', self.seed, 0)
        positive('progress_period', self.progress_period)
        for name in ('frame_id', 'pose_frame_id'):
            if not getattr(self, name):
                raise ConfigError(f'{name} must not be empty, got {getattr(self, name)!r}')

    @property
    def dt(self) -> float:
        """Sim seconds per tick (one frame)."""
        return 1.0 / self.rate

    @property
    def period(self) -> float:
        """Wall seconds per tick."""
        return 1.0 / (self.rate * self.time_scale)

    def sim_config(self) -> SimConfig:
        """The world this node simulates (raises ConfigError naming the bad value)."""
        return SimConfig(
            camera=CameraConfig(width=self.width, height=self.height),
            robot=RobotConfig(
                track_width=self.track_width,
                max_wheel_speed=self.max_wheel_speed,
                wheel_noise=self.wheel_noise,
            ),
            dt=self.dt,
            seed=self.seed,
            reset_on_off_track=self.reset_on_off_track,
        )


class CommandHold:
    """The latest command and when it came; stale commands read as stop (thread-safe)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        self._value = (0.0, 0.0)
        self._at: float | None = None
        self.received = 0

    def put(self, a: float, b: float, now: float) -> None:
        if not (math.isfinite(a) and math.isfinite(b)):
            return  # a NaN command must not move (or break) the robot; it is simply ignored
        with self._lock:
            self._value = (float(a), float(b))
            self._at = now
            self.received += 1

    def get(self, now: float) -> tuple[tuple[float, float], bool]:
        """(the command to apply now, whether it is fresh)."""
        with self._lock:
            if self._at is None or now - self._at > self.timeout:
                return (0.0, 0.0), False
            return self._value, True


def yaw_quaternion(theta: float) -> tuple[float, float, float, float]:
    """(x, y, z, w) of a rotation by ``theta`` about +z."""
    return 0.0, 0.0, math.sin(theta / 2.0), math.cos(theta / 2.0)


def progress_report(
    world: SimWorld,
    *,
    lap_times: list[float],
    off_track_at: list[tuple[float, float]],
    decision_at: list[tuple[float, float]] | None = None,
    resets: int = 0,
    commands: int = 0,
    stale_ticks: int = 0,
    started: bool = True,
) -> dict[str, Any]:
    """The ``~/progress`` JSON object.

    Keys: ``time`` (sim s since the last reset), ``steps``, ``laps``, ``off_track_events``,
    ``off_track_at_fork`` (those of them that began in the fork), ``forks``, ``forks_correct``,
    ``distance`` (m), ``mean_speed`` (distance / time, m/s), ``pose`` ([x, y, theta]),
    ``lap_s`` (m along the loop), ``cue`` (this lap's),
    ``decisions`` ([{lap, cue, branch, correct, time, at}] - one per fork passed, ``at`` the
    [x, y] where it was read off, when known), ``lap_times``
    (sim s at each lap completed), ``off_track_at`` ([[x, y]], at most the last 200),
    ``resets`` (~/reset calls), ``commands`` (commands received in total), ``stale_ticks``
    (ticks driven as stop because no fresh command was there), ``started`` (sim time runs:
    see ``start_on_command``), ``seed``.
    """
    summary = world.summary()
    pose = world.pose
    where = list(decision_at or [])
    decisions = []
    for i, d in enumerate(world.fork_decisions):
        item: dict[str, Any] = {
            'lap': d.lap,
            'cue': d.cue,
            'branch': d.branch,
            'correct': bool(d.correct),
            'time': round(d.time, 3),
        }
        if i < len(where):
            item['at'] = [round(where[i][0], 3), round(where[i][1], 3)]
        decisions.append(item)
    return {
        **summary,
        'mean_speed': round(world.distance / world.time, 4) if world.time > 0 else 0.0,
        'pose': [round(pose.x, 4), round(pose.y, 4), round(pose.theta, 4)],
        'lap_s': round(world.lap_s, 4),
        'cue': world.cue,
        'decisions': decisions,
        'lap_times': [round(t, 3) for t in lap_times],
        'off_track_at': [[round(x, 3), round(y, 3)] for x, y in off_track_at],
        'resets': resets,
        'commands': commands,
        'stale_ticks': stale_ticks,
        'started': started,
        'seed': world.seed,
    }


def write_atomically(path: Path, text: str) -> None:
    """Write beside ``path`` and rename, so a reader never sees half a file."""
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    tmp.write_text(text)
    tmp.replace(path)


# --- the node ----------------------------------------------------------------------------------


_D = SimNodeConfig()

# name -> ParamSpec (default, description, range); read once at start into SimNodeConfig.
PARAMETERS: dict[str, ParamSpec] = {
    'rate': ParamSpec(_D.rate, 'frames per second of sim time; 1/rate is the sim step', 1, 100),
    'time_scale': ParamSpec(_D.time_scale, 'sim seconds per wall second (1 = real time)', 0.1, 20),
    'input': ParamSpec(_D.input, f'what drives the robot: {" | ".join(INPUTS)}'),
    'input_timeout': ParamSpec(
        _D.input_timeout,
        'a command older than this (wall s) counts as stop',
        0.01,
        10.0,
    ),
    'seed': ParamSpec(_D.seed, 'seeds cues, light, noise, slip, start pose', 0, 2**31 - 1),
    'width': ParamSpec(_D.width, 'camera image width (px)', 8, 1920),
    'height': ParamSpec(_D.height, 'camera image height (px)', 8, 1080),
    'track_width': ParamSpec(
        _D.track_width,
        'distance between the wheel tracks (m); the motor driver must mix with the same',
        0.01,
        2.0,
    ),
    'max_wheel_speed': ParamSpec(
        _D.max_wheel_speed,
        'ground speed of a wheel at throttle 1.0 (m/s); the same as the motor driver',
        0.01,
        10.0,
    ),
    'wheel_noise': ParamSpec(_D.wheel_noise, 'relative std of wheel speed per step', 0.0, 0.5),
    'reset_on_off_track': ParamSpec(
        _D.reset_on_off_track,
        'put the robot back on the tape after an off-track event (the run goes on)',
    ),
    'frame_id': ParamSpec(_D.frame_id, 'frame_id of the camera images'),
    'pose_frame_id': ParamSpec(_D.pose_frame_id, 'frame_id of ~/pose (the floor map)'),
    'progress_period': ParamSpec(
        _D.progress_period,
        'wall seconds between ~/progress reports (events are reported at once)',
        0.05,
        60.0,
    ),
    'progress_file': ParamSpec(
        _D.progress_file, 'also write each progress report to this file ("" = do not)'
    ),
    'start_on_command': ParamSpec(
        _D.start_on_command,
        'sim time stands still (frames still go out) until the first command that moves',
    ),
    'supervisor': ParamSpec(
        _D.supervisor,
        'a simulated person: the expert takes over on teleop/cmd_vel when the robot strays',
    ),
}


class SimNode(Node):
    """Steps a SimWorld on a timer, publishes what its camera sees, obeys the wheel commands."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        freeze_use_sim_time(self)
        values = declare_parameters(self, PARAMETERS)
        self.cfg = SimNodeConfig(**values)
        self.world = SimWorld(self.cfg.sim_config())
        self._command = CommandHold(self.cfg.input_timeout)
        self._lock = threading.Lock()  # the world: timer vs. reset service
        self._ticks = 0
        self._started = not self.cfg.start_on_command
        self._resets = 0
        self._stale_ticks = 0
        self._lap_times: list[float] = []
        self._off_track_at: list[tuple[float, float]] = []
        self._decision_at: list[tuple[float, float]] = []
        self._progress_path = Path(self.cfg.progress_file) if self.cfg.progress_file else None
        self._supervisor: Supervisor | None = None
        if self.cfg.supervisor:
            world = self.world
            self._supervisor = Supervisor(Expert(world.track, world.actions, world.config.expert))
            # Reliable depth 10, as teleop_twist_keyboard and teleop_twist_joy publish.
            self._teleop_pub = self.create_publisher(Twist, 'teleop/cmd_vel', 10)

        # Sensor-data QoS (best effort, keep last 1): what camera drivers offer, and what
        # policy_node subscribes with - the newest frame matters, old ones are worthless.
        self._image_pub = self.create_publisher(Image, 'camera/image_raw', qos_profile_sensor_data)
        self._pose_pub = self.create_publisher(PoseStamped, '~/pose', 10)
        self._progress_pub = self.create_publisher(String, '~/progress', 10)
        if self.cfg.input == 'wheels':
            # Reliable depth 10: what motor_driver_node publishes ~/wheels with.
            self.create_subscription(Float32MultiArray, 'wheels', self._on_wheels, 10)
        else:
            qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
            self.create_subscription(Twist, 'cmd_vel', self._on_cmd_vel, qos)
        self.create_service(Trigger, '~/reset', self._on_reset)
        # Steady timers: the world's pace is set in wall seconds (rate x time_scale); under
        # use_sim_time with no /clock, timers on the node's clock would freeze the simulator.
        steady_timer(self, self.cfg.period, self._on_tick)
        steady_timer(self, self.cfg.progress_period, self._publish_progress)
        self.get_logger().info(
            f'sim at {self.cfg.rate:g} Hz x{self.cfg.time_scale:g}, seed {self.cfg.seed}, '
            f'{self.cfg.width}x{self.cfg.height} camera, input {self.cfg.input}, '
            f'track {self.world.track.length:.2f} m'
        )
        self._publish_frame()  # the first frame, before anything moved
        self._publish_progress()

    # -- inputs --

    def _on_wheels(self, msg: Float32MultiArray) -> None:
        if len(msg.data) != 2:
            self.get_logger().warning(
                f'wheels needs [left, right], got {len(msg.data)} values: ignored',
                throttle_duration_sec=2.0,
            )
            return
        self._command.put(msg.data[0], msg.data[1], time.monotonic())

    def _on_cmd_vel(self, msg: Twist) -> None:
        self._command.put(msg.linear.x, msg.angular.z, time.monotonic())

    def _on_reset(self, _request: Trigger.Request, response: Trigger.Response) -> Any:
        with self._lock:
            before = self.world.summary()
            self.world.reset(self.cfg.seed)
            if self._supervisor is not None:
                self._supervisor.reset()
            self._started = not self.cfg.start_on_command
            self._resets += 1
            self._lap_times.clear()
            self._off_track_at.clear()
            self._decision_at.clear()
        response.success = True
        response.message = (
            f'reset to the start (seed {self.cfg.seed}) after {before["laps"]} laps, '
            f'{before["steps"]} steps'
        )
        self.get_logger().info(response.message)
        self._publish_frame()
        self._publish_progress()
        return response

    # -- the loop --

    def _on_tick(self) -> None:
        (a, b), fresh = self._command.get(time.monotonic())
        with self._lock:
            if not self._started and not (fresh and (a, b) != (0.0, 0.0)):
                # Waiting for the driver: the start pose, frame after frame, no sim time.
                self._publish_frame_locked()
                return
            if not self._started:
                self._started = True
                self.get_logger().info('first command: sim time runs')
            if not fresh:
                self._stale_ticks += 1
            if self.cfg.input == 'wheels':
                result = self.world.step((a, b))
            else:
                result = self.world.step_twist(a, b)
            self._ticks += 1
            event = self._note(result)
            action = None
            if self._supervisor is not None:
                action = self._supervisor.act(self.world.pose, self.world.target_branch)
        if action is not None:
            chosen = self.world.actions.actions[action]
            twist = Twist()
            twist.linear.x, twist.angular.z = chosen.linear_x, chosen.angular_z
            self._teleop_pub.publish(twist)
        self._publish_frame()
        if event:
            self._publish_progress()

    def _note(self, result: WorldStep) -> bool:
        """Remember lap times and off-track positions; True when something worth a report."""
        if result.lap_completed:
            self._lap_times.append(self.world.time)
        if result.off_track_event:
            pose = self.world.pose
            self._off_track_at.append((pose.x, pose.y))
            del self._off_track_at[:-MAX_OFF_TRACK_MARKS]
        if result.decision is not None:
            d = result.decision
            self._decision_at.append((self.world.pose.x, self.world.pose.y))
            self.get_logger().info(
                f'lap {d.lap}: cue {d.cue}, took the {d.branch} branch '
                f'({"right" if d.correct else "WRONG"})'
            )
        return result.lap_completed or result.off_track_event or result.decision is not None

    def _publish_frame(self) -> None:
        with self._lock:
            self._publish_frame_locked()

    def _publish_frame_locked(self) -> None:
        frame = self.world.render()
        pose = self.world.pose
        stamp = self.get_clock().now().to_msg()
        img = Image(**encode_image_fields(frame, 'rgb8'))
        img.header.stamp = stamp
        img.header.frame_id = self.cfg.frame_id
        self._image_pub.publish(img)
        self._pose_pub.publish(self._pose_msg(pose, stamp))

    def _pose_msg(self, pose: Pose, stamp: Any) -> PoseStamped:
        msg = PoseStamped()
        msg.header.stamp = stamp
        msg.header.frame_id = self.cfg.pose_frame_id
        msg.pose.position.x = float(pose.x)
        msg.pose.position.y = float(pose.y)
        q = yaw_quaternion(pose.theta)
        msg.pose.orientation.x, msg.pose.orientation.y = q[0], q[1]
        msg.pose.orientation.z, msg.pose.orientation.w = q[2], q[3]
        return msg

    def progress(self) -> dict[str, Any]:
        with self._lock:
            report = progress_report(
                self.world,
                lap_times=list(self._lap_times),
                off_track_at=list(self._off_track_at),
                decision_at=list(self._decision_at),
                resets=self._resets,
                commands=self._command.received,
                stale_ticks=self._stale_ticks,
                started=self._started,
            )
            if self._supervisor is not None:
                report['takeovers'] = self._supervisor.takeovers  # since the last ~/reset
            return report

    def close(self) -> None:
        """Last words (``runner.run_node``): one more progress report, so a reader of
        ``progress_file`` or ``~/progress`` sees the end of the run."""
        if rclpy.ok(context=self.context):
            self._publish_progress()

    def _publish_progress(self) -> None:
        text = json.dumps(self.progress())
        self._progress_pub.publish(String(data=text))
        if self._progress_path is not None:
            try:
                write_atomically(self._progress_path, text)
            except OSError as err:
                self.get_logger().error(
                    f'cannot write {self._progress_path}: {err}', throttle_duration_sec=5.0
                )


def main(args: list[str] | None = None) -> None:
    """Run until SIGINT/SIGTERM (exit 0, after a last progress report); exit 2 on bad
    parameters."""
    run_node(NODE_NAME, SimNode, args)


if __name__ == '__main__':
    main()
