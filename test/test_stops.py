"""The robot's graph under simulation time, and a process killed: the wheels must still stop.

camera (a child process: ``/clock`` and frames stamped on it, as a simulator publishes) →
``policy_node`` (a bundle that always drives forward) → ``cmd_vel`` → ``motor_driver_node``
(``backend:=sim``, whose ``~/wheels`` the test reads). Then the camera, or the policy node, is
killed with SIGKILL. Before issue 11 the nodes' stops ran on ROS timers, which stand still under
``use_sim_time`` once ``/clock`` stops (the camera was the clock) or never ran: the wheels kept
their last throttle for good. Now they must be zero within ``cmd_timeout`` + 50 ms of the last
command the driver received (the driver's watchdog ticks every 20 ms), plus SCHEDULING_SLACK:
this is timed from the test process, across DDS and three processes on a loaded 2-core machine.
The driver's own timing is asserted to the 50 ms in test_motor_driver_node.py.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from geometry_msgs.msg import Twist
from modelfactory import make_tiny_bundle
from rosgraph import graph
from std_msgs.msg import Float32MultiArray
from support import NODE_DIR, ros_env, running, stop

from malpi_ros.runtime.motor import MotorConfig, mix

pytestmark = pytest.mark.ros

POLICY = str(NODE_DIR / 'policy_node')
DRIVER = str(NODE_DIR / 'motor_driver_node')
WHEELS = '/motor_driver_node/wheels'
CMD_TIMEOUT = 0.5
STOP_MARGIN = 0.05
SCHEDULING_SLACK = 0.2
SIM_OFFSET = 1000.0  # sim time runs 1000 s behind the wall clock: a wall-clock node would
# find every frame 1000 s old, so a stepped frame proves the node ages frames on /clock

# A camera that may also be the simulator's clock: /clock at 100 Hz, a 24x32 frame at 20 Hz.
CAMERA = """
import sys, time
import numpy as np
import rclpy
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image
from rclpy.qos import qos_profile_sensor_data
offset, with_clock = float(sys.argv[1]), sys.argv[2] == 'clock'
rclpy.init()
node = rclpy.create_node('camera')
clock = node.create_publisher(Clock, '/clock', 10)
image = node.create_publisher(Image, 'image', qos_profile_sensor_data)
frame = np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8).tobytes()
tick = 0
while True:
    now = time.time() - offset
    sec, nanosec = int(now), int((now % 1) * 1e9)
    msg = Clock()
    msg.clock.sec, msg.clock.nanosec = sec, nanosec
    if with_clock:
        clock.publish(msg)
    if tick % 5 == 0:
        img = Image(height=24, width=32, encoding='rgb8', step=96, data=frame)
        img.header.stamp.sec, img.header.stamp.nanosec = sec, nanosec
        image.publish(img)
    tick += 1
    time.sleep(0.01)
"""


@pytest.fixture(scope='module')
def forward_bundle(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp('stops') / 'bundle', dt=0.05, always='forward')


def twist_of(msg: Twist) -> tuple[float, float]:
    return (msg.linear.x, msg.angular.z)


# How use_sim_time is set: 'sim-clock': both nodes at start, the camera publishes /clock
# (killing it stops the clock too); 'no-clock': the driver at start, nothing publishes /clock
# (the policy node stays on wall time so that it can drive); 'run-time': a parameter service
# call to both nodes, no /clock.
@pytest.mark.parametrize(
    'killed, setup',
    [
        ('camera', 'sim-clock'),
        ('camera', 'run-time'),
        ('policy', 'sim-clock'),
        ('policy', 'no-clock'),
    ],
)
def test_a_killed_process_under_sim_time_still_stops_the_wheels(
    forward_bundle, tmp_path, killed, setup
):
    env = ros_env()
    at_start = ['-p', 'use_sim_time:=true']
    policy_cmd = [
        POLICY,
        '--ros-args',
        '-p',
        f'bundle:={forward_bundle}',
        '-p',
        f'stop_after:={CMD_TIMEOUT}',
        '-p',
        'max_frame_age:=0.5',
        *(at_start if setup == 'sim-clock' else []),
    ]
    driver_cmd = [DRIVER, '--ros-args', '-p', 'backend:=sim', '-p', f'cmd_timeout:={CMD_TIMEOUT}']
    driver_cmd += at_start if setup in ('sim-clock', 'no-clock') else []
    clock = setup == 'sim-clock'
    offset = SIM_OFFSET if clock else 0.0
    camera_cmd = [sys.executable, '-c', CAMERA, str(offset), 'clock' if clock else 'none']
    logs = {name: tmp_path / f'{name}.log' for name in ('policy', 'driver')}
    with (
        graph(int(env['ROS_DOMAIN_ID'])) as g,
        running(driver_cmd, env, logs['driver']) as driver,
        running(policy_cmd, env, logs['policy']) as policy,
    ):
        wheels = g.collect(Float32MultiArray, WHEELS)
        cmd = g.collect(Twist, 'cmd_vel')
        if setup == 'run-time':  # a `ros2 param set` on both nodes, before anything moves
            for node in ('/policy_node', '/motor_driver_node'):
                result = g.set_parameter(node, 'use_sim_time', True, timeout=60)
                assert not result.successful and 'read-only' in result.reason
        camera = subprocess.Popen(camera_cmd, env=env)
        try:
            want = mix(0.3, 0.0, MotorConfig(cmd_timeout=CMD_TIMEOUT))  # 'forward'
            driving = wheels.wait_for(
                lambda got: bool(got) and tuple(got[-1].msg.data) == pytest.approx(want), 60.0
            )
            assert driving, f'{wheels.messages()[-3:]}\n{logs["policy"].read_text()}'
            # and the test hears the policy's commands too (its reader may match later)
            assert cmd.wait_for(lambda got: any(twist_of(r.msg) != (0.0, 0.0) for r in got), 30)
            victim = camera if killed == 'camera' else policy
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            killed_at = time.monotonic()
            assert wheels.wait_for(
                lambda got: any(r.at > killed_at and tuple(r.msg.data) == (0.0, 0.0) for r in got),
                3.0,
            ), f'wheels never stopped: {wheels.messages()[-3:]}\n{logs["driver"].read_text()}'
            last_cmd = max(r.at for r in cmd.snapshot() if twist_of(r.msg) != (0.0, 0.0))
            stopped = next(
                r.at
                for r in wheels.snapshot()
                if r.at > last_cmd and tuple(r.msg.data) == (0.0, 0.0)
            )
            took = stopped - last_cmd
            print(f'{killed} killed, {setup}: wheels zero {took:.3f} s after the last command')
            assert took <= CMD_TIMEOUT + STOP_MARGIN + SCHEDULING_SLACK
            time.sleep(0.3)  # and they stay stopped
            assert tuple(wheels.messages()[-1].data) == (0.0, 0.0)
        finally:
            stop(camera)
        assert driver.poll() is None
    if killed == 'camera':  # the policy node said why it stopped
        assert 'published a zero Twist' in logs['policy'].read_text()
