"""The motor core without ROS: mixing, limits, deadband, watchdog, backends, config checks."""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest
import yaml
from support import SHARE_DIR

from malpi_ros.errors import ConfigError, MotorError
from malpi_ros.runtime.motor import (
    MOTORKIT_PIP,
    MotorConfig,
    SimBackend,
    Watchdog,
    drive,
    halt,
    make_backend,
    mix,
)

# Round numbers: a wheel at 0.5 m/s is throttle 1.0; half the track is 0.075 m.
CFG = MotorConfig(
    track_width=0.15, max_wheel_speed=0.5, max_linear=0.3, max_angular=2.0, deadband=0.1
)


def test_forward_drives_both_wheels_equally():
    assert mix(0.25, 0.0, CFG) == pytest.approx((0.5, 0.5))
    assert mix(-0.1, 0.0, CFG) == pytest.approx((-0.2, -0.2))


def test_a_left_turn_speeds_up_the_right_wheel():
    left, right = mix(0.2, 1.0, CFG)
    assert left == pytest.approx((0.2 - 0.075) / 0.5)
    assert right == pytest.approx((0.2 + 0.075) / 0.5)
    assert mix(0.2, -1.0, CFG) == pytest.approx((right, left))


def test_spin_in_place_runs_the_wheels_in_opposite_directions():
    left, right = mix(0.0, 2.0, CFG)
    assert left == pytest.approx(-0.3)
    assert right == pytest.approx(0.3)


def test_saturation_scales_both_wheels_and_keeps_the_turn_radius():
    cfg = dataclasses.replace(CFG, max_linear=1.0)
    raw_left, raw_right = (0.5 - 0.15) / 0.5, (0.5 + 0.15) / 0.5  # 0.7, 1.3: right saturates
    left, right = mix(0.5, 2.0, cfg)
    assert right == pytest.approx(1.0)
    assert left / right == pytest.approx(raw_left / raw_right)
    assert max(abs(t) for t in mix(-1.0, -2.0, cfg)) == pytest.approx(1.0)


def test_throttles_inside_the_deadband_become_zero():
    assert mix(0.02, 0.0, CFG) == (0.0, 0.0)  # 0.04 < 0.1
    left, right = mix(0.05, 0.5, CFG)  # left 0.025 stalls, right 0.175 does not
    assert left == 0.0
    assert right == pytest.approx(0.175)
    assert mix(0.05, 0.0, dataclasses.replace(CFG, deadband=0.0)) == pytest.approx((0.1, 0.1))


def test_invert_flags_flip_one_side_and_a_stop_stays_plus_zero():
    cfg = dataclasses.replace(CFG, invert_left=True)
    assert mix(0.25, 0.0, cfg) == pytest.approx((-0.5, 0.5))
    cfg = dataclasses.replace(CFG, invert_right=True)
    assert mix(0.25, 0.0, cfg) == pytest.approx((0.5, -0.5))
    both = dataclasses.replace(CFG, invert_left=True, invert_right=True)
    left, right = mix(0.0, 0.0, both)
    assert math.copysign(1.0, left) == 1.0 and math.copysign(1.0, right) == 1.0


def test_commands_are_clamped_to_the_limits():
    assert mix(5.0, 0.0, CFG) == mix(0.3, 0.0, CFG)
    assert mix(-5.0, 0.0, CFG) == mix(-0.3, 0.0, CFG)
    assert mix(0.0, -100.0, CFG) == mix(0.0, -2.0, CFG)
    assert mix(0.3, 0.0, CFG) == pytest.approx((0.6, 0.6))


@pytest.mark.parametrize(
    'linear, angular',
    [(math.nan, 0.0), (0.1, math.nan), (math.inf, 0.0), (0.0, -math.inf), (math.nan, math.inf)],
)
def test_non_finite_commands_stop(linear, angular):
    assert mix(linear, angular, CFG) == (0.0, 0.0)


def test_watchdog_is_expired_until_fed_and_after_the_timeout():
    dog = Watchdog(0.5)
    assert dog.expired(0.0) and dog.expired(1000.0)
    assert dog.last_feed is None
    dog.feed(10.0)
    assert not dog.expired(10.0)
    assert not dog.expired(10.49)
    assert dog.expired(10.5)
    dog.feed(10.6)
    assert not dog.expired(11.0)
    assert dog.last_feed == 10.6
    with pytest.raises(ConfigError, match='got -1'):
        Watchdog(-1)


def test_sim_backend_reports_every_command_and_the_stop():
    seen = []
    sim = make_backend('sim', CFG, on_apply=lambda left, right: seen.append((left, right)))
    assert isinstance(sim, SimBackend)
    sim.set_throttles(0.5, -0.25)
    sim.stop()
    assert seen == [(0.5, -0.25), (0.0, 0.0)]
    assert sim.throttles == (0.0, 0.0)
    assert sim.applied == 2
    sim.close()
    assert sim.closed
    SimBackend().set_throttles(0.1, 0.2)  # no callback: nothing to report, no error


def test_motorkit_without_the_library_names_the_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, 'adafruit_motorkit', None)  # import fails as if missing
    with pytest.raises(MotorError, match=f'pip install {MOTORKIT_PIP}'):
        make_backend('motorkit', CFG)


def test_an_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="got 'servo'"):
        make_backend('servo', CFG)


class Failing:
    """A backend whose hardware fails: set_throttles raises; stop raises if told to."""

    def __init__(self, stop_fails: bool = False) -> None:
        self.stop_fails = stop_fails
        self.stops = 0

    def set_throttles(self, left: float, right: float) -> None:
        raise OSError('I2C bus error')

    def stop(self) -> None:
        self.stops += 1
        if self.stop_fails:
            raise OSError('still no bus')

    def close(self) -> None:
        pass


def test_a_failing_backend_is_stopped_and_reported():
    backend = Failing()
    with pytest.raises(MotorError, match=r'I2C bus error.*motors stopped') as info:
        drive(backend, 0.5, 0.5)
    assert backend.stops == 1
    assert isinstance(info.value.__cause__, OSError)

    backend = Failing(stop_fails=True)
    with pytest.raises(MotorError, match='stopping failed too: OSError: still no bus'):
        drive(backend, 0.5, 0.5)
    assert backend.stops == 1
    with pytest.raises(MotorError, match='stopping the motors failed'):
        halt(backend)


def test_drive_and_halt_pass_through_to_a_working_backend():
    sim = SimBackend()
    drive(sim, 0.3, -0.3)
    assert sim.throttles == (0.3, -0.3)
    halt(sim)
    assert sim.throttles == (0.0, 0.0)


@pytest.mark.parametrize(
    'field, value, message',
    [
        ('track_width', -0.1, 'track_width must be > 0, got -0.1'),
        ('max_wheel_speed', 0.0, 'max_wheel_speed must be > 0, got 0.0'),
        ('max_linear', math.nan, 'max_linear must be > 0, got nan'),
        ('max_angular', 'fast', "max_angular must be > 0, got 'fast'"),
        ('cmd_timeout', 0, 'cmd_timeout must be > 0, got 0'),
        ('deadband', 1.0, r'deadband must be a throttle in \[0, 1\), got 1.0'),
        ('deadband', -0.1, 'got -0.1'),
        ('invert_left', 1, 'invert_left must be true or false, got 1'),
        ('left_channel', 5, 'left_channel must be a motor channel 1..4, got 5'),
        ('right_channel', 1.0, 'right_channel must be a motor channel 1..4, got 1.0'),
        ('right_channel', 1, 'must differ, both are 1'),
    ],
)
def test_config_errors_say_what_was_received(field, value, message):
    with pytest.raises(ConfigError, match=message):
        MotorConfig(**{field: value})


@pytest.mark.parametrize('name', ['motor_driver.yaml', 'robot.yaml'])
def test_installed_config_files_hold_a_valid_motor_config(name):
    params = yaml.safe_load((SHARE_DIR / 'config' / 'nodes' / name).read_text())
    params = dict(params['motor_driver_node']['ros__parameters'])
    assert params.pop('backend') == 'motorkit'
    assert params.pop('watchdog_rate') > 0
    assert params.pop('teleop_timeout') == 0.3
    assert params.pop('applied_rate') > 0
    cfg = MotorConfig(**params)
    assert cfg.cmd_timeout == 0.5
    assert set(params) == {f.name for f in dataclasses.fields(MotorConfig)}
