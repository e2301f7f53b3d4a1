"""House rules as tests: ruff lint and format, and the import boundaries of the layer folders.

Folders, not name suffixes, say where a module belongs (README "Layout"):
- ``nodes/`` is the only place that imports rclpy or message packages: the rest runs and is
  tested without a ROS graph;
- ``learn/`` is the only place that imports TensorFlow/Keras, so the robot's LiteRT process
  never pays for it;
- ``runtime/`` (what the robot loads) never imports ``nodes/``, and ``learn/`` only lazily
  (inside a function: the keras backend);
- nothing imports ``nodes/`` but ``commands/``, lazily (``nodes/`` itself aside);
- the base modules at the top import no layer folder;
- no module imports another's private (``_name``) function, class or constant: what two
  modules share gets a public name.
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
TF_MODULES = ('tensorflow', 'keras')
LAYERS = ('runtime', 'learn', 'bagio', 'sim', 'nodes', 'commands')


def _imports(path: Path) -> list[tuple[int, str, bool]]:
    """Every module name imported in a file, with its line and whether the import is lazy
    (inside a function)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    lazy_lines = {
        inner.lineno
        for func in ast.walk(tree)
        if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef)
        for inner in ast.walk(func)
        if isinstance(inner, ast.Import | ast.ImportFrom)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # Relative imports inside malpi_ros (from .msg import X) count as malpi_ros.*.
            module = node.module or ''
            if node.level:
                module = 'malpi_ros.' + module if module else 'malpi_ros'
            names = [module, *(f'{module}.{a.name}' for a in node.names)]
        else:
            continue
        found += [(node.lineno, name, node.lineno in lazy_lines) for name in names]
    return found


def _matches(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == root or name.startswith(root + '.') for root in roots)


def _is_ros(name: str) -> bool:
    return _matches(name, ROS_MODULES) or name.split('.')[0].endswith(ROS_SUFFIXES)


def _layer(name: str) -> str | None:
    """The layer folder of a ``malpi_ros.<layer>...`` module name (None for base modules)."""
    parts = name.split('.')
    if parts[0] == 'malpi_ros' and len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return None


def _is_private(name: str) -> bool:
    return name.startswith('_') and not name.startswith('__')


def boundary_violations(package_dir: Path) -> list[str]:
    """'file:line imports X (rule)' for each import that breaks a folder rule; [] if none."""
    bad = []
    for path in sorted(package_dir.rglob('*.py')):
        rel = path.relative_to(package_dir)
        here = rel.parts[0] if len(rel.parts) > 1 else None  # None: a base module
        where = f'{path.relative_to(package_dir.parent)}'
        for line, name, lazy in _imports(path):
            target = _layer(name)
            rule = None
            if _is_ros(name) and here != 'nodes':
                rule = 'ROS only in nodes/'
            elif _matches(name, TF_MODULES) and here != 'learn':
                rule = 'TF only in learn/'
            elif target == 'nodes' and here not in ('nodes', 'commands'):
                rule = 'nodes/ only from commands/'
            elif target == 'nodes' and here == 'commands' and not lazy:
                rule = 'nodes/ only lazily'
            elif here == 'runtime' and target == 'learn' and not lazy:
                rule = 'learn/ only lazily'
            elif here is None and target is not None:
                rule = 'base imports no layer'
            elif _matches(name, ('malpi_ros',)) and _is_private(name.rsplit('.', 1)[-1]):
                rule = 'private name'
            if rule:
                bad.append(f'{where}:{line} imports {name} ({rule})')
    return bad


def test_the_layer_folders_keep_their_import_rules():
    assert boundary_violations(REPO / 'malpi_ros') == []


def test_the_boundary_check_catches_a_crossing(tmp_path):
    pkg = tmp_path / 'malpi_ros'
    files = {
        'runtime/image.py': 'def f():\n    from sensor_msgs.msg import Image\n',
        'nodes/camera_node.py': 'import rclpy\nfrom sensor_msgs.msg import Image\n',
        'runtime/policy.py': (
            'import tensorflow as tf\nfrom malpi_ros.learn import model\n'
            'def f():\n    from malpi_ros.learn.keras_step import KerasStep\n'
        ),
        'learn/model.py': 'import keras\nfrom malpi_ros.runtime import image\n',
        'bagio/stats.py': 'from . import msg\nimport action_msgs.msg\n',
        'sim/demo.py': 'from malpi_ros.nodes import sim_node\n',
        'commands/play.py': (
            'from malpi_ros.nodes import player_node\n'
            'def run():\n    from malpi_ros.nodes.player_node import play\n'
        ),
        'config.py': 'from malpi_ros.runtime.image import decode\n',
        'bagio/stamps.py': (
            'from malpi_ros.bagio.reader import _pick, open_bag\n'
            'from malpi_ros.runtime.latency import stamp_ns as _ns\n'
        ),
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    assert boundary_violations(pkg) == [
        'malpi_ros/bagio/stamps.py:1 imports malpi_ros.bagio.reader._pick (private name)',
        'malpi_ros/bagio/stats.py:1 imports malpi_ros.msg (ROS only in nodes/)',
        'malpi_ros/bagio/stats.py:2 imports action_msgs.msg (ROS only in nodes/)',
        'malpi_ros/commands/play.py:1 imports malpi_ros.nodes (nodes/ only lazily)',
        'malpi_ros/commands/play.py:1 imports malpi_ros.nodes.player_node (nodes/ only lazily)',
        'malpi_ros/config.py:1 imports malpi_ros.runtime.image (base imports no layer)',
        'malpi_ros/config.py:1 imports malpi_ros.runtime.image.decode (base imports no layer)',
        'malpi_ros/runtime/image.py:2 imports sensor_msgs.msg (ROS only in nodes/)',
        'malpi_ros/runtime/image.py:2 imports sensor_msgs.msg.Image (ROS only in nodes/)',
        'malpi_ros/runtime/policy.py:1 imports tensorflow (TF only in learn/)',
        'malpi_ros/runtime/policy.py:2 imports malpi_ros.learn (learn/ only lazily)',
        'malpi_ros/runtime/policy.py:2 imports malpi_ros.learn.model (learn/ only lazily)',
        'malpi_ros/sim/demo.py:1 imports malpi_ros.nodes (nodes/ only from commands/)',
        'malpi_ros/sim/demo.py:1 imports malpi_ros.nodes.sim_node (nodes/ only from commands/)',
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
