"""Our node processes from the outside: where they are installed, their ROS environment, and
a stop the way a person stops them (Ctrl-C first).

One helper for every tool that starts nodes as processes (the demo, replay-eval, the tests).
Our nodes answer SIGINT with their last words (a zero Twist, stopped motors, a closed bag) and
exit 0; only a process that hangs past ``timeout`` is killed. Every child runs with discovery
on this machine only and a ``ROS_DOMAIN_ID`` of the caller's choosing (DESIGN §6).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from malpi_ros.errors import ConfigError, MalpiError

PACKAGE = 'malpi_ros'
DEFAULT_DOMAIN_ID = 42  # the Makefile's, when the caller's environment names none


def install_prefix() -> Path:
    """The prefix this package is installed under (``<prefix>/lib/pythonX.Y/site-packages``):
    the venv here, colcon's install/ on a robot. ``sys.prefix`` when run from a source tree."""
    here = Path(__file__).resolve().parent
    for parent in here.parents:
        if (parent / 'lib' / PACKAGE).is_dir() and (parent / 'share' / PACKAGE).is_dir():
            return parent
    return Path(sys.prefix)


PREFIX = install_prefix()
NODE_DIR = PREFIX / 'lib' / PACKAGE  # where `ros2 run malpi_ros <name>` finds the executables
SHARE_DIR = PREFIX / 'share' / PACKAGE  # launch/, config/, msg/


def installed(name: str) -> list[str]:
    """The command line of an installed executable, run with this interpreter (so PATH and the
    current directory cannot pick another Python or shadow the installed package)."""
    path = NODE_DIR / name
    if not path.is_file():
        raise MalpiError(f'{path} is not installed: run `make build` first')
    return [sys.executable, str(path)]


def ros_env(domain_id: int | None = None, **extra: str) -> dict[str, str]:
    """This process's environment for a child: localhost discovery, one domain (``domain_id``,
    else ``ROS_DOMAIN_ID``, else 42), unbuffered output, quiet TensorFlow, the prefix's bin/
    first on PATH; ``extra`` on top."""
    env = dict(os.environ)
    if domain_id is None:
        domain_id = int(env.get('ROS_DOMAIN_ID') or DEFAULT_DOMAIN_ID)
    if not 0 <= domain_id <= 232:
        raise ConfigError(f'ROS domain id must be in [0, 232], got {domain_id}')
    env['ROS_DOMAIN_ID'] = str(domain_id)
    env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    env['PYTHONUNBUFFERED'] = '1'
    env['TF_CPP_MIN_LOG_LEVEL'] = '3'
    env['PATH'] = f'{PREFIX / "bin"}{os.pathsep}{env.get("PATH", "")}'
    env.update(extra)
    return env


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int:
    """SIGINT, wait up to ``timeout`` seconds, then kill; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)
