"""motor_driver_node: ``cmd_vel`` in, two wheel throttles out, and the motors stopped when unsure.

Example (no hardware): ``motor_driver_node --ros-args -p backend:=sim -p cmd_timeout:=0.3``

The ROS glue around ``malpi_ros.runtime.motor`` (mixing, watchdog and backends live there, tested
without ROS). Safety behaviour (DESIGN §5):

- at start, before ``cmd_vel`` is subscribed, the motors are set to zero: a driver that was
  respawned after a crash takes over motors that may still hold the dead one's last throttle
  (a PCA9685 keeps its PWM); if that stop fails the node exits (code 2) rather than drive;
- each ``cmd_vel`` (geometry_msgs/Twist) is mixed and applied at once;
- a timer at ``watchdog_rate`` stops the motors when no ``cmd_vel`` came for ``cmd_timeout``
  seconds (logged once per expiry with the measured silence; the motors stay stopped until the
  next command). The timer runs on the steady clock and the silence is measured with
  ``time.monotonic()``: ``use_sim_time`` (read-only here, chosen at start) cannot stop it;
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
from std_msgs.msg import Float32MultiArray

from malpi_ros.errors import MotorError
from malpi_ros.nodes.params import ParamSpec
from malpi_ros.nodes.runner import (
    declare_parameters,
    freeze_use_sim_time,
    run_node,
    steady_timer,
)
from malpi_ros.runtime.motor import (
    BACKENDS,
    MotorBackend,
    MotorConfig,
    Watchdog,
    drive,
    halt,
    make_backend,
    mix,
)

NODE_NAME = 'motor_driver_node'
ERROR_LOG_PERIOD = 2.0  # s between repeated backend-error logs
FLUSH_TIMEOUT = 1.0  # s to wait for the final stop on ~/wheels to be acknowledged


_DEFAULTS = MotorConfig()

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
}


class MotorDriverNode(Node):
    """Subscribes ``cmd_vel``, drives the motor backend, stops it on timeout and on close()."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        freeze_use_sim_time(self)
        values = declare_parameters(self, PARAMETERS)
        backend_name = values.pop('backend')
        rate = values.pop('watchdog_rate')
        self.cfg = MotorConfig(**values)
        self._watchdog = Watchdog(self.cfg.cmd_timeout)
        self.errors = 0

        # reliable depth 10: tests and the simulator must see every applied command, stops too.
        self._wheels = self.create_publisher(Float32MultiArray, '~/wheels', 10)
        on_apply = self._publish_wheels if backend_name == 'sim' else None
        # Public so a test or an embedding process can wrap it (e.g. to inject faults).
        self.backend: MotorBackend = make_backend(backend_name, self.cfg, on_apply)
        # Zero before the first command can arrive (MotorError: exit 2, nothing subscribed).
        halt(self.backend)
        self._halted = True  # True while stopped by us; a command clears it

        # Reliable (what teleop, nav2 and our policy_node publish), depth 1: only the newest
        # command may move the motors; a queue of older ones would replay stale intent.
        qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
        self.create_subscription(Twist, 'cmd_vel', self._on_cmd_vel, qos)
        steady_timer(self, 1.0 / rate, self._on_tick)
        self.get_logger().info(
            f'backend {backend_name}, cmd_timeout {self.cfg.cmd_timeout} s, limits '
            f'{self.cfg.max_linear} m/s {self.cfg.max_angular} rad/s; motors stopped, waiting '
            'for cmd_vel'
        )

    def _publish_wheels(self, left: float, right: float) -> None:
        self._wheels.publish(Float32MultiArray(data=[left, right]))

    def _report(self, err: MotorError) -> None:
        self.errors += 1
        self.get_logger().error(
            f'{err} ({self.errors} motor errors so far)', throttle_duration_sec=ERROR_LOG_PERIOD
        )

    def _on_cmd_vel(self, msg: Twist) -> None:
        self._watchdog.feed(time.monotonic())
        left, right = mix(msg.linear.x, msg.angular.z, self.cfg)
        try:
            drive(self.backend, left, right)
        except MotorError as err:
            self._report(err)
            return
        self._halted = False

    def _on_tick(self) -> None:
        now = time.monotonic()
        if self._halted or not self._watchdog.expired(now):
            return
        try:
            halt(self.backend)
        except MotorError as err:
            self._report(err)  # not halted: the next tick tries again
            return
        self._halted = True
        last = self._watchdog.last_feed
        # The measured silence (last command -> this stop) is in the log: tests assert it.
        silence = 'before any' if last is None else f'{now - last:.3f} s after the last'
        self.get_logger().warning(
            f'no cmd_vel for {self.cfg.cmd_timeout} s: motors stopped ({silence} cmd_vel)'
        )

    last_words = 'stopping the motors and exiting'  # close(), said in the log

    def close(self) -> None:
        """Stop and release the motors; the final stop on ~/wheels is flushed before return."""
        try:
            halt(self.backend)
        except MotorError as err:
            self._report(err)
        if self.context.ok():
            # The process exits right after this: wait until subscribers acknowledged the stop.
            self._wheels.wait_for_all_acked(Duration(seconds=FLUSH_TIMEOUT))
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
