"""motor_driver_node as installed, in its own process, driven over a real DDS graph.

The test joins the node's domain with ``rosgraph.graph``, publishes ``cmd_vel`` and reads the
sim backend's ``~/wheels``; the expected throttles come from ``malpi_ros.runtime.motor.mix``.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from geometry_msgs.msg import Twist
from rclpy.parameter import Parameter
from rosgraph import Graph, Inbox, Received, graph
from std_msgs.msg import Float32MultiArray
from support import NODE_DIR, SHARE_DIR, ros_env, running, stop, wait_for

from malpi_ros.nodes.motor_driver_node import NODE_ONLY, MotorDriverNode
from malpi_ros.runtime.motor import MOTORKIT_PIP, MotorConfig, SimBackend, mix

pytestmark = pytest.mark.ros

NODE = str(NODE_DIR / 'motor_driver_node')
WHEELS = '/motor_driver_node/wheels'
ROBOT_YAML = SHARE_DIR / 'config' / 'nodes' / 'robot.yaml'
PERIOD = 0.05  # 20 Hz, a policy's command rate


def twist(linear_x: float, angular_z: float) -> Twist:
    msg = Twist()
    msg.linear.x = linear_x
    msg.angular.z = angular_z
    return msg


def wheels_of(received: Received[Float32MultiArray]) -> tuple[float, float]:
    left, right = received.msg.data
    return left, right


def is_close(got: tuple[float, float], want: tuple[float, float]) -> bool:
    return all(abs(g - w) < 1e-6 for g, w in zip(got, want, strict=True))  # float32 on the wire


def drive_until(
    pub, inbox: Inbox[Float32MultiArray], command: Twist, want: tuple[float, float], timeout=10.0
) -> bool:
    """Publish ``command`` at 20 Hz until ``~/wheels`` last showed ``want``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pub.publish(command)
        got = inbox.snapshot()
        if got and is_close(wheels_of(got[-1]), want):
            return True
        time.sleep(PERIOD)
    return False


def connect(g: Graph, log: Path):
    """Subscribe ~/wheels, make the cmd_vel publisher, and wait until both ends are matched."""
    inbox = g.collect(Float32MultiArray, WHEELS)
    pub = g.publisher(Twist, 'cmd_vel')
    assert g.wait_matched(pub), f'motor_driver_node never subscribed cmd_vel:\n{log.read_text()}'
    assert g.wait_publishers(WHEELS), f'no {WHEELS} publisher:\n{log.read_text()}'
    return pub, inbox


def test_cmd_vel_is_mixed_onto_the_wheels_and_stops_after_cmd_timeout(tmp_path):
    env = ros_env()
    log = tmp_path / 'node.log'
    cmd = [NODE, '--ros-args', '-p', 'backend:=sim', '-p', 'cmd_timeout:=0.3']
    with graph(int(env['ROS_DOMAIN_ID'])) as g, running(cmd, env, log) as proc:
        pub, wheels = connect(g, log)
        cfg = MotorConfig(cmd_timeout=0.3)
        for linear, angular in [(0.2, 0.0), (0.2, 1.0), (0.0, -2.0), (-0.3, 0.5)]:
            want = mix(linear, angular, cfg)
            assert want != (0.0, 0.0)
            assert drive_until(pub, wheels, twist(linear, angular), want), (
                f'({linear}, {angular}) never gave {want}: {wheels.messages()[-3:]}'
            )
        last_sent = time.monotonic()  # stop publishing: the watchdog must stop the motors
        assert wheels.wait_for(
            lambda got: any(r.at > last_sent and wheels_of(r) == (0.0, 0.0) for r in got), 3.0
        ), f'no stop after cmd_vel ended: {wheels.messages()[-3:]}'
        stop = next(r for r in wheels.snapshot() if r.at > last_sent and wheels_of(r) == (0, 0))
        assert 0.25 <= stop.at - last_sent <= 0.3 + 0.4
        assert proc.poll() is None
    assert 'no cmd_vel for 0.3 s: motors stopped' in log.read_text()


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_a_signal_stops_the_motors_and_exits_cleanly(tmp_path, sig):
    env = ros_env()
    log = tmp_path / 'node.log'
    # A long cmd_timeout: the only stop can come from the shutdown, not the watchdog.
    cmd = [NODE, '--ros-args', '-p', 'backend:=sim', '-p', 'cmd_timeout:=10.0']
    with graph(int(env['ROS_DOMAIN_ID'])) as g, running(cmd, env, log) as proc:
        pub, wheels = connect(g, log)
        want = mix(0.3, 0.0, MotorConfig())
        assert drive_until(pub, wheels, twist(0.3, 0.0), want)
        signalled = time.monotonic()
        proc.send_signal(sig)
        while proc.poll() is None and time.monotonic() - signalled < 10:
            pub.publish(twist(0.3, 0.0))  # commands keep coming; the stop must still be last
            time.sleep(PERIOD)
        assert proc.wait(5) == 0, log.read_text()
        assert wheels.wait_for(
            lambda got: bool(got) and wheels_of(got[-1]) == (0.0, 0.0) and got[-1].at > signalled,
            2.0,
        ), f'last wheels {wheels.messages()[-3:]}, log:\n{log.read_text()}'
        before = [r for r in wheels.snapshot() if r.at <= signalled]
        assert before and is_close(wheels_of(before[-1]), want)
    assert f'{sig.name}: stopping the motors' in log.read_text()


def test_robot_yaml_with_a_sim_override_drives_with_its_values(tmp_path):
    params = yaml.safe_load(ROBOT_YAML.read_text())['motor_driver_node']['ros__parameters']
    cfg = MotorConfig(**{k: v for k, v in params.items() if k not in NODE_ONLY})
    env = ros_env()
    log = tmp_path / 'node.log'
    cmd = [NODE, '--ros-args', '--params-file', str(ROBOT_YAML), '-p', 'backend:=sim']
    with graph(int(env['ROS_DOMAIN_ID'])) as g, running(cmd, env, log) as proc:
        pub, wheels = connect(g, log)
        assert drive_until(pub, wheels, twist(0.25, -1.5), mix(0.25, -1.5, cfg))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0, log.read_text()
    assert f'cmd_timeout {cfg.cmd_timeout} s' in log.read_text()


@pytest.mark.parametrize(
    'args, expected',
    [
        (['-p', 'backend:=sim', '-p', 'track_width:=-0.1'], ['track_width', '-0.1']),
        (['-p', 'backend:=sim', '-p', 'left_channel:=2'], ['left_channel', 'both are 2']),
        (['-p', 'backend:=wheels'], ["got 'wheels'"]),
        (['--params-file', str(ROBOT_YAML)], [f'pip install {MOTORKIT_PIP}']),
    ],
    ids=['negative-track', 'same-channels', 'unknown-backend', 'motorkit-missing'],
)
def test_bad_parameters_exit_non_zero_naming_them(args, expected):
    out = subprocess.run(
        [NODE, '--ros-args', *args],
        env=ros_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    for fragment in expected:
        assert fragment in out.stderr


class Flaky:
    """Wraps the sim backend; its first ``failures`` commands fail as a flaky I2C bus would."""

    def __init__(self, inner: SimBackend, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    def set_throttles(self, left: float, right: float) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise OSError('I2C bus error')
        self.inner.set_throttles(left, right)

    def stop(self) -> None:
        self.inner.stop()

    def close(self) -> None:
        self.inner.close()


def test_a_failing_backend_is_stopped_reported_and_retried():
    env = ros_env()
    with graph(int(env['ROS_DOMAIN_ID'])) as g:
        node = g.add_node(
            MotorDriverNode(
                context=g.context,
                parameter_overrides=[
                    Parameter('backend', value='sim'),
                    Parameter('cmd_timeout', value=10.0),
                ],
            )
        )
        sim = node.backend
        assert isinstance(sim, SimBackend)
        wheels = g.collect(Float32MultiArray, WHEELS)
        pub = g.publisher(Twist, 'cmd_vel')
        assert g.wait_matched(pub)
        # A first command through the healthy backend proves ~/wheels reaches us.
        assert drive_until(pub, wheels, twist(0.1, 0.0), mix(0.1, 0.0, node.cfg))
        node.backend = Flaky(sim, failures=3)
        wheels.clear()
        want = mix(0.2, 0.5, node.cfg)
        assert drive_until(pub, wheels, twist(0.2, 0.5), want)
        assert node.errors == 3
        # each failure was followed by a stop, before the next command got through
        got = [wheels_of(r) for r in wheels.snapshot()]
        assert got[:3] == [(0.0, 0.0)] * 3
        assert is_close(got[3], want)
        closing = time.monotonic()  # (a cmd_vel still queued may be applied after the stop)
        node.close()
        assert wheels.wait_for(
            lambda got: any(r.at > closing and wheels_of(r) == (0.0, 0.0) for r in got), 2.0
        )
        assert sim.closed


# --- stops that nothing switches off (issue 11) --------------------------------------------

# The driver logs the silence it measured when its watchdog stopped the motors: the driver's
# own stop timing, due within cmd_timeout + 50 ms (one 20 ms watchdog tick at the default
# 50 Hz, and the rest for the executor). A process that gets no CPU is late whatever its timer
# says (seen: 0.103 s late at load average 8 on this 2-core machine, shared by four test
# sessions), so both the driver's figure and the test's own view (the stop crossing DDS and
# two processes' schedulers) get SCHEDULING_SLACK on top.
STOP_MARGIN = 0.05
SCHEDULING_SLACK = 0.2
STOP_LOG = re.compile(r'motors stopped \((\d+\.\d+) s after the last cmd_vel\)')


def assert_stops_in_time(
    wheels: Inbox[Float32MultiArray], last_sent: float, timeout: float, log: Path
) -> None:
    """The wheels go to zero within timeout + STOP_MARGIN (+ SCHEDULING_SLACK) of the last
    command, as the driver measured it and as the test saw it; never before the timeout."""
    assert wheels.wait_for(
        lambda got: any(r.at > last_sent and wheels_of(r) == (0.0, 0.0) for r in got), 3.0
    ), f'no stop after cmd_vel ended: {wheels.messages()[-3:]}\n{log.read_text()}'
    stop = next(r for r in wheels.snapshot() if r.at > last_sent and wheels_of(r) == (0, 0))
    assert stop.at - last_sent <= timeout + STOP_MARGIN + SCHEDULING_SLACK
    assert wait_for(lambda: STOP_LOG.search(log.read_text()) is not None, 2.0), log.read_text()
    measured = float(STOP_LOG.search(log.read_text()).group(1))
    assert timeout <= measured <= timeout + STOP_MARGIN + SCHEDULING_SLACK, log.read_text()


@pytest.mark.parametrize('when', ['at-start', 'at-run-time'])
def test_use_sim_time_without_clock_does_not_switch_the_watchdog_off(tmp_path, when):
    env = ros_env()
    log = tmp_path / 'node.log'
    cmd = [NODE, '--ros-args', '-p', 'backend:=sim', '-p', 'cmd_timeout:=0.3']
    if when == 'at-start':
        cmd += ['-p', 'use_sim_time:=true']  # and nothing publishes /clock
    with graph(int(env['ROS_DOMAIN_ID'])) as g, running(cmd, env, log) as proc:
        pub, wheels = connect(g, log)
        if when == 'at-run-time':
            result = g.set_parameter('/motor_driver_node', 'use_sim_time', True)
            assert not result.successful and 'read-only' in result.reason
        want = mix(0.3, 0.0, MotorConfig(cmd_timeout=0.3))
        assert drive_until(pub, wheels, twist(0.3, 0.0), want)
        last_sent = time.monotonic()  # one command, then silence
        assert_stops_in_time(wheels, last_sent, 0.3, log)
        assert proc.poll() is None


SUBSCRIBER = """
import sys, time
import rclpy
from std_msgs.msg import Float32MultiArray
rclpy.init()
node = rclpy.create_node('slow_wheels_reader')
node.create_subscription(Float32MultiArray, sys.argv[1], lambda msg: None, 10)
while node.count_publishers(sys.argv[1]) < 1:
    rclpy.spin_once(node, timeout_sec=0.05)
print('matched', flush=True)
rclpy.spin(node)
"""


def test_a_second_ctrl_c_during_the_final_flush_still_releases_the_backend(tmp_path):
    env = ros_env()
    log = tmp_path / 'node.log'
    cmd = [NODE, '--ros-args', '-p', 'backend:=sim', '-p', 'cmd_timeout:=10.0']
    with graph(int(env['ROS_DOMAIN_ID'])) as g, running(cmd, env, log) as proc:
        pub, wheels = connect(g, log)
        reader = subprocess.Popen(
            [sys.executable, '-c', SUBSCRIBER, WHEELS], env=env, stdout=subprocess.PIPE, text=True
        )
        try:
            assert reader.stdout.readline().strip() == 'matched'
            assert drive_until(pub, wheels, twist(0.3, 0.0), mix(0.3, 0.0, MotorConfig()))
            # A reader that cannot acknowledge: the driver's final flush waits its full second.
            reader.send_signal(signal.SIGSTOP)
            proc.send_signal(signal.SIGINT)
            assert wait_for(lambda: 'SIGINT: stopping the motors' in log.read_text(), 10)
            time.sleep(0.3)  # inside the flush
            proc.send_signal(signal.SIGINT)
            assert proc.wait(10) == 0, log.read_text()
        finally:
            reader.send_signal(signal.SIGCONT)
            stop(reader)
    text = log.read_text()
    assert 'Traceback' not in text and 'KeyboardInterrupt' not in text
    assert 'motor backend released' in text
    assert '1 more signal(s) during the clean-up: finished it first' in text
