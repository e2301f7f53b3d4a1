"""The motorkit path end to end, with a stand-in for the Adafruit library (no HAT here).

``adafruit_motorkit`` is replaced by a module of the same interface written into the test's tmp
dir and put on PYTHONPATH: ``MotorKit().motorN.throttle = x`` appends ``[pid, N, x]`` to a file,
so the test sees every write the real driver (or ``malpi-ros motors-off``) makes, in order and
from which process. What is checked: zeros at start (before ``cmd_vel`` is subscribed), driving,
zero then release on SIGTERM, zeros from a driver started after a kill -9, and ``motors-off``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from geometry_msgs.msg import Twist
from rosgraph import graph
from support import NODE_DIR, SHARE_DIR, ros_env, running, wait_for

from malpi_ros.runtime.motor import MotorConfig, mix

pytestmark = pytest.mark.ros

NODE = str(NODE_DIR / 'motor_driver_node')
CLI = str(NODE_DIR / 'malpi-ros')
ROBOT_YAML = SHARE_DIR / 'config' / 'nodes' / 'robot.yaml'

FAKE_MOTORKIT = '''
"""Stand-in for adafruit_motorkit: the interface the driver uses, writes logged to a file."""
import json, os

_LOG = os.environ['FAKE_MOTORKIT_LOG']


class DCMotor:
    def __init__(self, channel):
        self._channel = channel
        self._throttle = None

    @property
    def throttle(self):
        return self._throttle

    @throttle.setter
    def throttle(self, value):
        if value is not None and not -1.0 <= value <= 1.0:
            raise ValueError('Throttle must be None or between -1.0 and +1.0')
        self._throttle = value
        with open(_LOG, 'a') as stream:
            stream.write(json.dumps([os.getpid(), self._channel, value]) + '\\n')


class MotorKit:
    def __init__(self, address=0x60, i2c=None, steppers_microsteps=16, pwm_frequency=1600.0):
        if os.environ.get('FAKE_MOTORKIT_ABSENT'):
            raise ValueError('No I2C device at address: 0x60')
        self.motor1, self.motor2, self.motor3, self.motor4 = (DCMotor(n) for n in (1, 2, 3, 4))
'''


class FakeHat:
    """The stand-in library in ``tmp`` and its write log."""

    def __init__(self, tmp: Path) -> None:
        (tmp / 'fake_lib').mkdir()
        (tmp / 'fake_lib' / 'adafruit_motorkit.py').write_text(FAKE_MOTORKIT)
        self.log = tmp / 'throttles.jsonl'
        self.log.touch()
        self.pythonpath = str(tmp / 'fake_lib')

    def env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        env = dict(base if base is not None else ros_env())
        env['PYTHONPATH'] = os.pathsep.join(filter(None, [self.pythonpath, env.get('PYTHONPATH')]))
        env['FAKE_MOTORKIT_LOG'] = str(self.log)
        env.update(extra)
        return env

    def writes(self, pid: int | None = None) -> list[tuple[int, float | None]]:
        """(motor, throttle) in write order, of one process or all."""
        rows = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [(motor, value) for who, motor, value in rows if pid is None or who == pid]

    def state(self) -> dict[int, float | None]:
        """The last throttle written to each motor: what the HAT would be doing now."""
        return dict(self.writes())


def twist(linear_x: float) -> Twist:
    msg = Twist()
    msg.linear.x = linear_x
    return msg


@pytest.fixture
def hat(tmp_path) -> FakeHat:
    return FakeHat(tmp_path)


def drive(g, hat: FakeHat, want: tuple[float, float], log: Path) -> None:
    """Publish forward commands until the HAT holds ``want`` on M1, M2."""
    pub = g.publisher(Twist, 'cmd_vel')
    assert g.wait_matched(pub), log.read_text()

    def driving() -> bool:
        pub.publish(twist(0.3))
        state = hat.state()
        return (state.get(1), state.get(2)) == pytest.approx(want)

    assert wait_for(driving, 10.0), f'{hat.writes()}\n{log.read_text()}'


WANT = mix(0.3, 0.0, MotorConfig())


def motors_off(hat: FakeHat, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """The installed ``malpi-ros motors-off``, with the stand-in library."""
    return subprocess.run(
        [CLI, 'motors-off', *args],
        env=hat.env(**extra),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_driver_zeroes_at_start_drives_and_zeroes_then_releases_on_sigterm(hat, tmp_path):
    env = hat.env()
    log = tmp_path / 'node.log'
    cmd = [NODE, '--ros-args', '--params-file', str(ROBOT_YAML)]
    with graph(int(env['ROS_DOMAIN_ID'])) as g, running(cmd, env, log) as proc:
        pub = g.publisher(Twist, 'cmd_vel')
        assert g.wait_matched(pub), log.read_text()
        # cmd_vel is subscribed only after the zeros went out
        assert hat.writes(proc.pid)[:2] == [(1, 0.0), (2, 0.0)], log.read_text()
        drive(g, hat, WANT, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, log.read_text()
    writes = hat.writes(proc.pid)
    assert writes[-4:] == [(1, 0.0), (2, 0.0), (1, None), (2, None)]  # stop, then release
    assert 'motor backend released' in log.read_text()


def test_after_a_kill_the_next_driver_and_motors_off_zero_the_hat(hat, tmp_path):
    env = hat.env()
    log = tmp_path / 'node.log'
    cmd = [NODE, '--ros-args', '--params-file', str(ROBOT_YAML)]
    with graph(int(env['ROS_DOMAIN_ID'])) as g:
        with running(cmd, env, log) as proc:
            drive(g, hat, WANT, log)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        # What the issue saw on the sim wheels: the dead driver's throttle stays applied.
        assert (hat.state()[1], hat.state()[2]) == pytest.approx(WANT)
        # A respawned driver takes over: zeros before anything else.
        with running(cmd, env, tmp_path / 'respawned.log') as again:
            assert wait_for(lambda: len(hat.writes(again.pid)) >= 2, 30.0)
            assert hat.writes(again.pid)[:2] == [(1, 0.0), (2, 0.0)]
            assert hat.state() == {1: 0.0, 2: 0.0}
            drive(g, hat, WANT, log)
            again.send_signal(signal.SIGKILL)
            again.wait(10)
    assert (hat.state()[1], hat.state()[2]) == pytest.approx(WANT)
    # ...and motors-off (systemd ExecStopPost=) with the driver's own parameters file.
    out = motors_off(hat, '--params-file', str(ROBOT_YAML))
    assert out.returncode == 0, out.stdout + out.stderr
    assert 'motors M1 and M2: throttle 0, released' in out.stdout
    writes = hat.writes()
    assert writes[-4:] == [(1, 0.0), (2, 0.0), (1, None), (2, None)]


def test_motors_off_follows_the_params_file_channels_and_says_what_failed(hat, tmp_path):
    params = yaml.safe_load(ROBOT_YAML.read_text())
    params['motor_driver_node']['ros__parameters'].update(left_channel=3, right_channel=4)
    custom = tmp_path / 'custom.yaml'
    custom.write_text(yaml.safe_dump(params))
    out = motors_off(hat, '--params-file', str(custom))
    assert out.returncode == 0, out.stderr
    assert hat.writes() == [(3, 0.0), (4, 0.0), (3, None), (4, None)]
    out = motors_off(hat, '--params-file', str(custom), '--left-channel', '1')
    assert out.returncode == 0 and hat.writes()[-4:] == [(1, 0.0), (4, 0.0), (1, None), (4, None)]
    out = motors_off(hat, FAKE_MOTORKIT_ABSENT='1')
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith('malpi-ros motors-off: error: ')
    assert 'cannot open the Motor HAT: ValueError: No I2C device at address: 0x60' in out.stderr
    assert 'Traceback' not in out.stderr
    out = motors_off(hat, '--left-channel', '2')
    assert out.returncode == 1
    assert 'left_channel and right_channel must differ, both are 2' in out.stderr
