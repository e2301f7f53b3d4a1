"""malpi-ros motors-off [--params-file /etc/malpi/robot.yaml]

Set the Motor HAT's two drive motors to throttle 0 and release them, without ROS: for systemd's
``ExecStopPost=`` of the robot's service, a respawn hook, or by hand after the motor driver died
(kill -9, OOM, a segfault). The HAT's PCA9685 keeps its last PWM when the process that set it
dies; this writes the zeros the dead driver could not. Reads the channels from the
``motor_driver_node`` section of the parameters file the driver runs with (``--left-channel`` /
``--right-channel`` override them), builds the same motorkit backend the driver uses, stops it
(throttle 0: brake) and releases it (throttle None: coast). Exits 0 when both writes went
through, 1 with one line naming the failure otherwise (no library, no HAT, an I2C error).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from malpi_ros.errors import ConfigError, MotorError
from malpi_ros.runtime.motor import MotorConfig, MotorKitBackend, halt

NODE_NAME = 'motor_driver_node'
_FIELDS = {f.name for f in dataclasses.fields(MotorConfig)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--params-file',
        type=Path,
        help='ROS parameters file of the motor driver (its motor_driver_node section; '
        'default: MotorConfig defaults, channels M1 and M2)',
    )
    parser.add_argument('--left-channel', type=int, help='Motor HAT terminal 1..4 (overrides)')
    parser.add_argument('--right-channel', type=int, help='Motor HAT terminal 1..4 (overrides)')


def driver_parameters(path: Path) -> dict[str, Any]:
    """The motor driver's ``ros__parameters`` in a ROS parameters file (``/**`` merged first)."""
    import yaml  # only --params-file needs it

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f'cannot read parameters file {path}: {err}') from err
    if not isinstance(data, dict):
        raise ConfigError(f'parameters file {path} must be a mapping, got {type(data).__name__}')
    params: dict[str, Any] = {}
    for key in ('/**', NODE_NAME, f'/{NODE_NAME}'):
        section = data.get(key)
        if section is None:
            continue
        values = section.get('ros__parameters') if isinstance(section, dict) else None
        if not isinstance(values, dict):
            raise ConfigError(f'{path}: {key} has no ros__parameters mapping')
        params.update(values)
    return params


def motor_config(args: argparse.Namespace) -> MotorConfig:
    params = driver_parameters(args.params_file) if args.params_file is not None else {}
    values = {k: v for k, v in params.items() if k in _FIELDS}
    for side in ('left', 'right'):
        given = getattr(args, f'{side}_channel')
        if given is not None:
            values[f'{side}_channel'] = given
    where = args.params_file or 'arguments'
    try:
        return MotorConfig(**values)
    except ConfigError as err:
        raise ConfigError(f'{where}: {err}') from err


def run(args: argparse.Namespace) -> int:
    cfg = motor_config(args)
    backend = MotorKitBackend(cfg)
    halt(backend)
    try:
        backend.close()
    except Exception as err:  # the library's I2C errors come in many types; name the cause
        raise MotorError(
            f'motors set to 0, but releasing them failed: {type(err).__name__}: {err}'
        ) from err
    print(f'motors M{cfg.left_channel} and M{cfg.right_channel}: throttle 0, released')
    return 0
