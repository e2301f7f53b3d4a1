"""House rules as tests: ruff lint and format, and the import boundaries of DESIGN §7.

Only *_node.py modules (and launch files) may import rclpy or message packages: the core must
run and be tested without a ROS graph. TensorFlow may only be imported where a model is built
or run, so the robot's LiteRT process never pays for it.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest
from support import REPO, VENV

ROS_MODULES = (
    'rclpy',
    'rcl_interfaces',
    'builtin_interfaces',
    'rosidl_runtime_py',
    'rosidl_parser',
    'ament_index_python',
    'launch',
    'launch_ros',
    'malpi_ros.msg',
)
# Any interface package: std_msgs, sensor_msgs, std_srvs, action_msgs, type_description_...
ROS_SUFFIXES = ('_msgs', '_srvs', '_interfaces', '_actions')
# Modules that build, convert, train or run Keras/TensorFlow models; nothing else imports it.
TF_MODULES = {
    'model.py',
    'runtime_keras.py',
    'export.py',
    'train.py',
    'pipeline.py',
    'sequence_runtime.py',
    'carried_state.py',
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module name imported in a file (top level or inside functions), with its line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # Relative imports inside malpi_ros (from .msg import X) count as malpi_ros.*.
            module = node.module or ''
            if node.level:
                module = 'malpi_ros.' + module if module else 'malpi_ros'
            found.append((node.lineno, module))
            found += [(node.lineno, f'{module}.{a.name}') for a in node.names]
    return found


def _matches(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == root or name.startswith(root + '.') for root in roots)


def _is_ros(name: str) -> bool:
    return _matches(name, ROS_MODULES) or name.split('.')[0].endswith(ROS_SUFFIXES)


def boundary_violations(package_dir: Path) -> list[str]:
    """'file:line imports X' for each import that crosses a boundary; empty when clean."""
    bad = []
    for path in sorted(package_dir.rglob('*.py')):
        is_node = path.name.endswith('_node.py')
        for line, name in _imports(path):
            if not is_node and _is_ros(name):
                bad.append(f'{path.relative_to(package_dir.parent)}:{line} imports {name}')
            if path.name not in TF_MODULES and _matches(name, ('tensorflow', 'keras')):
                bad.append(f'{path.relative_to(package_dir.parent)}:{line} imports {name}')
    return bad


def test_only_node_modules_import_ros_and_only_model_modules_import_tensorflow():
    assert boundary_violations(REPO / 'malpi_ros') == []


def test_the_boundary_check_catches_a_crossing(tmp_path):
    pkg = tmp_path / 'malpi_ros'
    pkg.mkdir()
    (pkg / 'image.py').write_text('def f():\n    from sensor_msgs.msg import Image\n')
    (pkg / 'camera_node.py').write_text('import rclpy\nfrom sensor_msgs.msg import Image\n')
    (pkg / 'policy.py').write_text('import tensorflow as tf\n')
    (pkg / 'model.py').write_text('import keras\n')
    (pkg / 'stats.py').write_text('from . import msg\nimport action_msgs.msg\n')
    assert boundary_violations(pkg) == [
        'malpi_ros/image.py:2 imports sensor_msgs.msg',
        'malpi_ros/image.py:2 imports sensor_msgs.msg.Image',
        'malpi_ros/policy.py:1 imports tensorflow',
        'malpi_ros/stats.py:1 imports malpi_ros.msg',
        'malpi_ros/stats.py:2 imports action_msgs.msg',
    ]


def _ruff() -> str:
    exe = VENV / 'bin' / 'ruff'
    return str(exe) if exe.exists() else shutil.which('ruff') or pytest.fail('ruff not installed')


def test_ruff_lint_is_clean():
    out = subprocess.run(
        [_ruff(), 'check', '--no-cache', '.'],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format_is_clean():
    out = subprocess.run(
        [_ruff(), 'format', '--check', '--no-cache', '.'],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
