"""motor_driver_node: ``cmd_vel`` in, two wheel throttles out, and the motors stopped when unsure.

Example (no hardware): ``motor_driver_node --ros-args -p backend:=sim -p cmd_timeout:=0.3``

The ROS glue around ``malpi_ros.runtime.motor`` (mixing, watchdog and backends live there, tested
without ROS) and ``malpi_ros.runtime.takeover`` (which input drives). Two inputs:
``cmd_vel`` (the policy) and ``teleop/cmd_vel`` (a person: keyboard, joystick, the simulator's
supervisor; remap it to your teleop's topic). Teleop wins while its last command is younger
than ``teleop_timeout``, then control returns to the policy's newest command; with no fresh
input the motors stop. What was applied - the clamped command, the throttles, the source
(policy, teleop, stop) - is published on ``~/applied`` (``malpi_ros/AppliedCommand``) at every
change, for every command applied, and at ``applied_rate``: recordings are labelled with it.
Each report carries the publish stamp of the command applied (its DDS source timestamp, from
the subscription's message info: a Twist has no header) and when the motors got it, so a
recording relates every applied command to the frame it came from (``runtime.latency``).
Safety behaviour (DESIGN §5):

- at start, before ``cmd_vel`` is subscribed, the motors are set to zero: a driver that was
  respawned after a crash takes over motors that may still hold the dead one's last throttle
  (a PCA9685 keeps its PWM); if that stop fails the node exits (code 2) rather than drive;
- each command of the input that drives (geometry_msgs/Twist) is mixed and applied at once; a
  policy command during a takeover is only remembered;
- a timer at ``watchdog_rate`` hands control back to the policy when teleop went stale, and
  stops the motors when neither input is fresh (no ``cmd_vel`` for ``cmd_timeout`` seconds, no
  teleop for ``teleop_timeout``; logged once per expiry with the measured silence; the motors
  stay stopped until the next command). The timer runs on the steady clock and the silence is
  measured with ``time.monotonic()``: ``use_sim_time`` (read-only here, chosen at start) cannot
  stop it;
- a failing backend is stopped and the error logged (throttled); the node keeps running and the
  next command tries again - a dead driver would look like a robot that ignores commands;
- SIGINT and SIGTERM stop the motors, flush that stop and release the backend before the
  process exits with code 0 (a second signal during that is noted, not obeyed); rclpy's own
  signal handlers are not installed because they shut the context down inside the handler,
  before a final stop could be published.

With ``backend:=sim`` every applied command, stops included, is published on ``~/wheels`` as
``std_msgs/Float32MultiArray`` with ``data=[left, right]`` (throttles in [-1, 1]). That type was
chosen because it is in std_msgs (any tool can echo or record it, no package of ours needed)
and two throttles need no header: the simulator and tests only want their values and order.
"""

from __future__ import annotations

import time
from typing import Any

from geometry_msgs.msg import Twist
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.subscription import MessageInfo
from std_msgs.msg import Float32MultiArray

from malpi_ros.errors import MotorError
from malpi_ros.msg import AppliedCommand
from malpi_ros.nodes.params import ParamSpec
from malpi_ros.nodes.runner import (
    declare_parameters,
    freeze_use_sim_time,
    run_node,
    set_time,
    steady_timer,
)
from malpi_ros.runtime.motor import (
    BACKENDS,
    MotorBackend,
    MotorConfig,
    clamp_command,
    drive,
    halt,
    make_backend,
    mix,
)
from malpi_ros.runtime.takeover import (
    POLICY,
    STOP,
    STOPPED,
    TELEOP,
    Arbiter,
    Selection,
    Velocity,
)

NODE_NAME = 'motor_driver_node'
# The inputs by source, for logs (the subscriptions name them as literals: test_launch reads them).
INPUT_TOPICS = {POLICY: 'cmd_vel', TELEOP: 'teleop/cmd_vel'}
ERROR_LOG_PERIOD = 2.0  # s between repeated backend-error logs
FLUSH_TIMEOUT = 1.0  # s to wait for the final stop on ~/wheels to be acknowledged


_DEFAULTS = MotorConfig()
# The node's own parameters; every other one is a MotorConfig field.
NODE_ONLY = ('backend', 'watchdog_rate', 'teleop_timeout', 'applied_rate')

# name -> ParamSpec (default, description, range); read once at start into MotorConfig.
PARAMETERS: dict[str, ParamSpec] = {
    'backend': ParamSpec('motorkit', f'motor backend: {" | ".join(BACKENDS)}'),
    'track_width': ParamSpec(
        _DEFAULTS.track_width,
        'distance between the wheel tracks (m)',
        0.01,
        2.0,
    ),
    'max_wheel_speed': ParamSpec(
        _DEFAULTS.max_wheel_speed,
        'ground speed of a wheel at throttle 1.0 (m/s)',
        0.01,
        10.0,
    ),
    'max_linear': ParamSpec(
        _DEFAULTS.max_linear,
        'cmd_vel linear.x is clamped to this (m/s)',
        0.01,
        10.0,
    ),
    'max_angular': ParamSpec(
        _DEFAULTS.max_angular,
        'cmd_vel angular.z is clamped to this (rad/s)',
        0.01,
        20.0,
    ),
    'deadband': ParamSpec(
        _DEFAULTS.deadband,
        'throttles below this magnitude become 0 (motors stall)',
        0.0,
        0.99,
    ),
    'cmd_timeout': ParamSpec(
        _DEFAULTS.cmd_timeout,
        'stop the motors when no cmd_vel came for this long (s)',
        0.05,
        10.0,
    ),
    'invert_left': ParamSpec(_DEFAULTS.invert_left, 'the left motor is wired backwards'),
    'invert_right': ParamSpec(_DEFAULTS.invert_right, 'the right motor is wired backwards'),
    'left_channel': ParamSpec(
        _DEFAULTS.left_channel,
        'Motor HAT terminal of the left motor (M1..M4)',
        1,
        4,
    ),
    'right_channel': ParamSpec(
        _DEFAULTS.right_channel,
        'Motor HAT terminal of the right motor (M1..M4)',
        1,
        4,
    ),
    # 50 Hz: the stop comes at most 20 ms after cmd_timeout (a Python tick costs ~50 us).
    'watchdog_rate': ParamSpec(50.0, 'how often the cmd_vel timeout is checked (Hz)', 1.0, 200.0),
    # 0.3 s: a joystick teleop publishes at 10-20 Hz while held, so two lost messages do not
    # hand the wheels back; short enough that letting go returns control at once.
    'teleop_timeout': ParamSpec(
        0.3,
        'teleop/cmd_vel wins over cmd_vel while its last command is younger than this (s)',
        0.05,
        10.0,
    ),
    'applied_rate': ParamSpec(
        10.0, '~/applied is published at every change and at this rate (Hz)', 0.1, 100.0
    ),
}


class MotorDriverNode(Node):
    """Subscribes ``cmd_vel``, drives the motor backend, stops it on timeout and on close()."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        freeze_use_sim_time(self)
        values = declare_parameters(self, PARAMETERS)
        backend_name = values.pop('backend')
        rate = values.pop('watchdog_rate')
        teleop_timeout = values.pop('teleop_timeout')
        self._applied_period = 1.0 / values.pop('applied_rate')
        self.cfg = MotorConfig(**values)
        self._arbiter = Arbiter(self.cfg.cmd_timeout, teleop_timeout)
        self.errors = 0
        # reliable depth 10: a recorder must see every change (a takeover's start and end).
        self._applied = self.create_publisher(AppliedCommand, '~/applied', 10)
        self._reported: tuple[float, ...] | None = None  # the last ~/applied, to spot changes
        self._reported_at = 0.0
        # Publish stamp (DDS source timestamp, ns) of each input's newest command, and the
        # (publish stamp, applied stamp) of what the motors got last: ~/applied carries both.
        self._sent_at = {POLICY: 0, TELEOP: 0}
        self._last_applied = (0, 0)

        # reliable depth 10: tests and the simulator must see every applied command, stops too.
        self._wheels = self.create_publisher(Float32MultiArray, '~/wheels', 10)
        on_apply = self._publish_wheels if backend_name == 'sim' else None
        # Public so a test or an embedding process can wrap it (e.g. to inject faults).
        self.backend: MotorBackend = make_backend(backend_name, self.cfg, on_apply)
        # Zero before the first command can arrive (MotorError: exit 2, nothing subscribed).
        halt(self.backend)
        self._driving = STOP  # the source applied now; STOP while stopped by us
        self._throttles = (0.0, 0.0)
        self._report_applied(time.monotonic(), self._arbiter.last)

        # Reliable (what teleop, nav2 and our policy_node publish), depth 1: only the newest
        # command may move the motors; a queue of older ones would replay stale intent.
        qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
        self.create_subscription(Twist, 'cmd_vel', self._on_cmd_vel, qos)
        self.create_subscription(Twist, 'teleop/cmd_vel', self._on_teleop, qos)
        steady_timer(self, 1.0 / rate, self._on_tick)
        self.get_logger().info(
            f'backend {backend_name}, cmd_timeout {self.cfg.cmd_timeout} s, teleop_timeout '
            f'{teleop_timeout} s, limits {self.cfg.max_linear} m/s {self.cfg.max_angular} rad/s; '
            'motors stopped, waiting for cmd_vel'
        )

    def _publish_wheels(self, left: float, right: float) -> None:
        self._wheels.publish(Float32MultiArray(data=[left, right]))

    def _report(self, err: MotorError) -> None:
        self.errors += 1
        self.get_logger().error(
            f'{err} ({self.errors} motor errors so far)', throttle_duration_sec=ERROR_LOG_PERIOD
        )

    # Two parameters: rclpy then passes the message info, whose source timestamp is when the
    # publisher sent the command (the only stamp a Twist carries).
    def _on_cmd_vel(self, msg: Twist, info: MessageInfo) -> None:
        self._on_input(POLICY, msg, info)

    def _on_teleop(self, msg: Twist, info: MessageInfo) -> None:
        self._on_input(TELEOP, msg, info)

    def _on_input(self, source: str, msg: Twist, info: MessageInfo) -> None:
        now = time.monotonic()
        self._arbiter.feed(source, now, Velocity(msg.linear.x, msg.angular.z))
        self._sent_at[source] = int(info['source_timestamp'])
        self._update(now, source)

    def _on_tick(self) -> None:
        self._update(time.monotonic(), None)

    def _update(self, now: float, fed: str | None) -> None:
        """Apply what the arbiter selects: a new command of the input that drives, a hand-over
        between inputs, or the stop when none is fresh; then report it if it changed or is due."""
        chosen = self._arbiter.select(now)
        applied = False  # a command newly given to the motors: reported, even if the same value
        if chosen.source == STOP:
            if self._driving != STOP:
                self._stop(now)
        elif chosen.source == fed or chosen.source != self._driving:
            applied = self._apply(chosen)
        if (
            applied
            or self._applied_key(chosen) != self._reported
            or now - self._reported_at >= self._applied_period
        ):
            self._report_applied(now, chosen)

    def _applied_now(self, source: str) -> None:
        """Remember what the motors just got: the command's publish stamp (0 for a stop) and
        the clock now."""
        sent = self._sent_at.get(source, 0)
        self._last_applied = (sent, self.get_clock().now().nanoseconds)

    def _apply(self, chosen: Selection) -> bool:
        """Drive the motors with the chosen command; False when the backend failed."""
        if chosen.source != self._driving and STOP not in (chosen.source, self._driving):
            self.get_logger().info(
                'teleop took over from the policy'
                if chosen.source == TELEOP
                else 'teleop went quiet: control back to the policy'
            )
        self._driving = chosen.source  # also on failure: the next command of it tries again
        left, right = mix(chosen.command.linear, chosen.command.angular, self.cfg)
        try:
            drive(self.backend, left, right)
        except MotorError as err:
            self._throttles = (0.0, 0.0)  # drive() stopped the backend
            self._last_applied = (0, 0)
            self._report(err)
            return False
        self._throttles = (left, right)
        self._applied_now(chosen.source)
        return True

    def _stop(self, now: float) -> None:
        try:
            halt(self.backend)
        except MotorError as err:
            self._report(err)  # not halted: the next tick tries again
            return
        self._driving = STOP
        self._throttles = (0.0, 0.0)
        self._applied_now(STOP)
        # The measured silence (last command -> this stop) is in the log: tests assert it.
        last = self._arbiter.last_input()
        if last is None:
            self.get_logger().warning(
                f'no cmd_vel for {self.cfg.cmd_timeout} s: motors stopped (before any cmd_vel)'
            )
            return
        source, when = last
        self.get_logger().warning(
            f'no cmd_vel for {self.cfg.cmd_timeout} s: motors stopped ({now - when:.3f} s after '
            f'the last {INPUT_TOPICS[source]})'
        )

    def _applied_key(self, chosen: Selection) -> tuple[float, ...]:
        """What ~/applied says, minus stamp and age: a new value is a change to report."""
        linear, angular = (
            (0.0, 0.0)
            if chosen.source == STOP
            else clamp_command(chosen.command.linear, chosen.command.angular, self.cfg)
        )
        return (float(chosen.code), linear, angular, *self._throttles)

    def _report_applied(self, now: float, chosen: Selection) -> None:
        key = self._applied_key(chosen)
        msg = AppliedCommand(source=chosen.code, linear_x=key[1], angular_z=key[2])
        msg.left, msg.right = self._throttles
        msg.header.stamp = self.get_clock().now().to_msg()
        fed = self._arbiter.fed_at(chosen.source)
        msg.command_age = 0.0 if fed is None else float(now - fed)
        set_time(msg.command_stamp, self._last_applied[0])
        set_time(msg.applied_stamp, self._last_applied[1])
        self._applied.publish(msg)
        self._reported = key
        self._reported_at = now

    last_words = 'stopping the motors and exiting'  # close(), said in the log

    def close(self) -> None:
        """Stop and release the motors; the final stop on ~/wheels and ~/applied is flushed
        before return."""
        try:
            halt(self.backend)
        except MotorError as err:
            self._report(err)
        if self.context.ok():
            self._driving = STOP
            self._throttles = (0.0, 0.0)
            self._applied_now(STOP)
            self._report_applied(time.monotonic(), STOPPED)
            # The process exits right after this: wait until subscribers acknowledged the stop.
            self._wheels.wait_for_all_acked(Duration(seconds=FLUSH_TIMEOUT))
            self._applied.wait_for_all_acked(Duration(seconds=FLUSH_TIMEOUT))
        try:
            self.backend.close()
        except Exception as err:  # closing is best effort; the stop above is what matters
            self.get_logger().error(f'closing the motor backend failed: {err}')
        else:
            self.get_logger().info('motor backend released')


def main(args: list[str] | None = None) -> None:
    """Run the driver until SIGINT/SIGTERM (motors stopped); exit 2 on bad parameters or a
    missing backend."""
    run_node(NODE_NAME, MotorDriverNode, args)


if __name__ == '__main__':
    main()
