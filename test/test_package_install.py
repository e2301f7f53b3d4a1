"""The package is installed the way colcon lays it out, and tests see that install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import NODE_DIR, REPO, SHARE_DIR, VENV, ros_env

import malpi_ros


def test_tests_import_the_installed_package_not_the_sources():
    installed = Path(malpi_ros.__file__).resolve()
    # The venv (make build) or a colcon install/ (colcon test): where the executables are too.
    assert NODE_DIR.parents[1].resolve() in installed.parents, (installed, NODE_DIR)
    assert REPO / 'malpi_ros' not in installed.parents


def test_generated_message_lives_beside_our_sources():
    from malpi_ros.errors import MalpiError
    from malpi_ros.msg import PolicyOutput

    msg = PolicyOutput(action=3, action_name='right', probabilities=[0.1, 0.9])
    assert msg.action_name == 'right'
    assert issubclass(MalpiError, Exception)


@pytest.mark.parametrize(
    'exe',
    ['policy_node', 'motor_driver_node', 'sim_node', 'record_node', 'player_node', 'malpi-ros'],
)
def test_executables_are_where_ros2_run_looks(exe):
    path = NODE_DIR / exe
    assert path.is_file(), f'{path} missing'
    assert path.stat().st_mode & 0o111, f'{path} not executable'
    assert path.read_text().startswith('#!/usr/bin/env python3')


def test_share_holds_package_xml_launch_and_config():
    assert (SHARE_DIR / 'package.xml').is_file()
    assert list((SHARE_DIR / 'launch').glob('*.launch.py'))
    assert list((SHARE_DIR / 'config').glob('*.yaml'))
    index = VENV / 'share' / 'ament_index' / 'resource_index' / 'packages' / 'malpi_ros'
    assert index.is_file()


def test_cli_entry_point_runs_from_the_install():
    out = subprocess.run(
        [str(NODE_DIR / 'malpi-ros'), '--help'],
        env=ros_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert 'malpi-ros' in out.stdout
    assert sys.executable  # the same venv interpreter runs the tests


def test_malpi_ros_is_on_the_venvs_path_and_runs_without_activation(tmp_path):
    """After `make test`, the README's `malpi-ros ...` work from the venv's bin/ (on PATH once
    activated), and by full path with no venv on PATH at all."""
    cli = VENV / 'bin' / 'malpi-ros'
    assert cli.is_file() and cli.stat().st_mode & 0o111, f'{cli} missing or not executable'
    bare = {k: v for k, v in ros_env().items() if k not in ('VIRTUAL_ENV', 'PYTHONPATH')}
    bare['PATH'] = '/usr/bin:/bin'
    out = subprocess.run(
        [str(cli), 'inspect', str(tmp_path / 'nothing')],
        env=bare,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1, out.stderr
    assert (
        out.stderr.strip()
        == f'malpi-ros inspect: error: bag {tmp_path / "nothing"}: no such file or directory'
    )


@pytest.mark.slow
def test_colcon_builds_and_tests_the_package_in_a_fresh_workspace(tmp_path):
    """What a robot does: colcon build, then colcon test, of a copy of the tracked files,
    against the pip ROS (so CMakeLists.txt and package.xml are checked by the real tool)."""
    colcon = VENV / 'bin' / 'colcon'
    assert colcon.exists(), 'colcon-common-extensions is in requirements-dev.txt: run make install'
    files = subprocess.run(
        ['git', 'ls-files', '-z'], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b'\0')
    src = tmp_path / 'src' / 'malpi_ros'
    for name in filter(None, files):
        target = src / name.decode()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO / name.decode()).read_bytes())
    env = ros_env(AMENT_PREFIX_PATH=str(VENV))
    build = subprocess.run(
        [str(colcon), 'build', '--merge-install', '--event-handlers', 'console_direct-',
         '--cmake-args', f'-DPython3_EXECUTABLE={sys.executable}', '-DBUILD_TESTING=ON',
         f'-DCMAKE_PROJECT_INCLUDE={src / "cmake" / "pip_ros_include_fix.cmake"}'],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    install = tmp_path / 'install'
    assert (install / 'lib' / 'malpi_ros' / 'policy_node').is_file()
    assert (install / 'share' / 'malpi_ros' / 'config' / 'nodes' / 'robot.yaml').is_file()
    # The registered suite, narrowed to a few files (the whole of it is make test's job).
    env['PYTEST_ADDOPTS'] = "-k 'fast_loop or package_install and not colcon or output_msg'"
    test = subprocess.run(
        [str(colcon), 'test', '--merge-install', '--return-code-on-test-failure',
         '--event-handlers', 'console_direct-'],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    log = tmp_path / 'build' / 'malpi_ros' / 'ament_cmake_pytest' / 'malpi_ros_pytest.txt'
    out = log.read_text() if log.exists() else test.stdout + test.stderr
    assert test.returncode == 0, out[-4000:]
    assert ' passed' in out and ' failed' not in out, out[-2000:]
