"""Launch files and config/nodes/robot.yaml against the nodes they start.

``launch_ros`` is not installable from PyPI, so the launch description itself is only checked
where it is importable (a ROS install); here that test is reported as skipped. What runs
everywhere: each launch file is read with ``ast`` and every executable, parameter name, remap
and launch argument it uses is checked against the installed nodes, so a typo fails without
launch_ros; and the command line the launch file stands for is run by hand.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import signal
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from modelfactory import make_tiny_bundle
from rosgraph import graph
from sensor_msgs.msg import Image
from support import NODE_DIR, SHARE_DIR, ros_env, running

from malpi_ros.msg import PolicyOutput
from malpi_ros.nodes.policy_node_config import PARAMETER_NAMES, PARAMETERS, PolicyNodeConfig
from malpi_ros.runtime import image

LAUNCH_DIR = SHARE_DIR / 'launch'
ROBOT_YAML = SHARE_DIR / 'config' / 'nodes' / 'robot.yaml'


NODE_MODULES = {'policy_node', 'motor_driver_node', 'sim_node'}


def declared_parameters(exe: str) -> set[str]:
    """Parameter names a node executable declares (its module's PARAMETERS table)."""
    return set(importlib.import_module(f'malpi_ros.nodes.{exe}').PARAMETERS)


def node_topics(exe: str) -> set[str]:
    """Relative topic names a node uses, i.e. what a launch file may remap.

    ``TOPICS`` of its pure config module (``malpi_ros.<exe>_config``) if it has one, else the
    string literals its module passes as topic names to ``create_subscription`` /
    ``create_publisher``.
    """
    config = f'malpi_ros.nodes.{exe}_config'
    if importlib.util.find_spec(config) is not None:
        return set(importlib.import_module(config).TOPICS)
    module = importlib.import_module(f'malpi_ros.nodes.{exe}')
    tree = ast.parse(Path(module.__file__).read_text())
    return {
        call.args[1].value
        for call in ast.walk(tree)
        if isinstance(call, ast.Call)
        and _call_name(call) in ('create_subscription', 'create_publisher')
        and len(call.args) > 1
        and isinstance(call.args[1], ast.Constant)
    }


def _constant(node: ast.AST | None) -> Any:
    return node.value if isinstance(node, ast.Constant) else None


def _call_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, 'id', '')


def _module_literals(tree: ast.Module) -> dict[str, Any]:
    """Module-level NAME = <literal> assignments (tables such as ARGUMENTS, REMAPS)."""
    found = {}
    for stmt in tree.body:
        target = stmt.targets[0] if isinstance(stmt, ast.Assign) else None
        if isinstance(stmt, ast.AnnAssign):
            target = stmt.target
        if isinstance(target, ast.Name) and stmt.value is not None:
            with contextlib.suppress(ValueError):  # not a literal: not a table
                found[target.id] = ast.literal_eval(stmt.value)
    return found


def _resolve(node: ast.AST | None, literals: dict[str, Any]) -> Any:
    """A literal, or NAME / NAME['key'] of a module-level literal table."""
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError):
        pass
    if isinstance(node, ast.Name):
        return literals.get(node.id)
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        return literals.get(node.value.id, {}).get(_constant(node.slice))
    return None


def launch_problems(source: str, params_yaml: dict[str, Any]) -> list[str]:
    """Every name in a launch file that no node or argument declares; empty when consistent."""
    tree = ast.parse(source)
    literals = _module_literals(tree)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    arguments = set()
    for call in calls:
        if _call_name(call) == 'DeclareLaunchArgument':
            name = _constant(call.args[0]) if call.args else None
            # declared in a loop over a table: its keys are the arguments
            arguments |= {name} if name is not None else set(literals.get('ARGUMENTS', {}))
    problems = []
    for call in calls:
        if _call_name(call) == 'LaunchConfiguration':
            name = _constant(call.args[0])
            if name not in arguments:
                problems.append(f'LaunchConfiguration({name!r}) is not a declared argument')
        if _call_name(call) != 'Node':
            continue
        kw = {k.arg: k.value for k in call.keywords}
        exe = _constant(kw.get('executable'))
        if exe not in NODE_MODULES or not (NODE_DIR / exe).is_file():
            problems.append(f'executable {exe!r} is not an installed node')
            continue
        if _constant(kw.get('name')) != exe or exe not in params_yaml:
            problems.append(f'node {exe!r}: name must be {exe!r} and have a section in the yaml')
        declared = declared_parameters(exe)
        for item in getattr(kw.get('parameters'), 'elts', []):
            if isinstance(item, ast.Dict):
                for key in map(_constant, item.keys):
                    if key not in declared:
                        problems.append(f'{exe}: parameter {key!r} is not declared by the node')
        remaps = kw.get('remappings')
        pairs = getattr(remaps, 'elts', None)
        if pairs is not None:
            sources = [_constant(p.elts[0]) if isinstance(p, ast.Tuple) else None for p in pairs]
        else:
            sources = [pair[0] for pair in _resolve(remaps, literals) or []]
        for topic in sources:
            if topic not in node_topics(exe):
                problems.append(f'{exe}: remaps {topic!r}, not one of its topics')
    return problems


def params_yaml_for(launch_file: Path) -> dict[str, Any]:
    """config/nodes/<name>.yaml for launch/<name>.launch.py: the file it passes by default."""
    name = launch_file.name.removesuffix('.launch.py')
    return yaml.safe_load((SHARE_DIR / 'config' / 'nodes' / f'{name}.yaml').read_text())


def launch_files() -> list[Path]:
    files = sorted(LAUNCH_DIR.glob('*.launch.py'))
    assert files, f'no launch files installed in {LAUNCH_DIR}'
    return files


def robot_yaml() -> dict[str, Any]:
    return yaml.safe_load(ROBOT_YAML.read_text())


@pytest.mark.parametrize('path', launch_files(), ids=lambda p: p.name)
def test_launch_file_names_only_declared_parameters_topics_and_arguments(path):
    assert launch_problems(path.read_text(), params_yaml_for(path)) == []


def test_the_launch_check_catches_typos():
    source = (LAUNCH_DIR / 'robot.launch.py').read_text()
    spoiled = (
        source.replace("'bundle': LaunchConfiguration", "'bundel': LaunchConfiguration")
        .replace("('image', ", "('images', ")
        .replace("LaunchConfiguration('camera_topic')", "LaunchConfiguration('camera')")
        .replace("executable='motor_driver_node'", "executable='motor_node'")
    )
    assert sorted(launch_problems(spoiled, robot_yaml())) == [
        "LaunchConfiguration('camera') is not a declared argument",
        "executable 'motor_node' is not an installed node",
        "policy_node: parameter 'bundel' is not declared by the node",
        "policy_node: remaps 'images', not one of its topics",
    ]


def test_robot_yaml_holds_every_policy_node_parameter_with_its_default():
    params = robot_yaml()['policy_node']['ros__parameters']
    assert set(params) == set(PARAMETER_NAMES) - {'bundle'}  # bundle: required, no default
    defaults = PolicyNodeConfig(bundle='/b')
    for name, value in params.items():
        assert value == getattr(defaults, name), name
        assert type(value) is type(PARAMETERS[name].default), name  # ROS parameters are typed
    assert {f.name for f in fields(PolicyNodeConfig)} == set(PARAMETER_NAMES)


def test_robot_launch_respawns_the_motor_driver_quickly():
    """A dead driver left the HAT on its last throttle; a new one zeroes it at start."""
    source = (LAUNCH_DIR / 'robot.launch.py').read_text()
    tree = ast.parse(source)
    literals = _module_literals(tree)
    nodes = {}
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and _call_name(call) == 'Node':
            kw = {k.arg: k.value for k in call.keywords}
            nodes[_constant(kw['executable'])] = kw
    driver = nodes['motor_driver_node']
    assert _resolve(driver.get('respawn'), literals) is True
    assert 0 < _resolve(driver.get('respawn_delay'), literals) <= 1.0


def _holds_node_parameters(path: Path) -> bool:
    data = yaml.safe_load(path.read_text())
    return isinstance(data, dict) and any(
        isinstance(v, dict) and 'ros__parameters' in v for v in data.values()
    )


def node_param_files() -> list[Path]:
    """config/nodes/*.yaml: the node parameter files (node: ros__parameters: ...)."""
    return sorted((SHARE_DIR / 'config' / 'nodes').glob('*.yaml'))


def test_node_parameter_files_and_training_recipes_live_apart():
    nodes = node_param_files()
    assert [p.name for p in nodes] == ['motor_driver.yaml', 'robot.yaml', 'sim.yaml']
    assert all(_holds_node_parameters(p) for p in nodes)
    recipes = sorted((SHARE_DIR / 'config').glob('*.yaml'))
    assert {p.name for p in recipes} >= {'sim_train.yaml', 'train_example.yaml'}
    assert not [p.name for p in recipes if _holds_node_parameters(p)]


@pytest.mark.parametrize('path', node_param_files(), ids=lambda p: p.name)
def test_param_files_name_only_declared_parameters(path):
    for node, section in yaml.safe_load(path.read_text()).items():
        assert node in NODE_MODULES, f'{path.name}: no node {node!r}'
        unknown = set(section['ros__parameters']) - declared_parameters(node)
        assert not unknown, f'{path.name}: {node}: {sorted(unknown)}'


@pytest.mark.ros
def test_the_launch_command_line_by_hand_drives_from_the_camera_topic(tmp_path):
    """policy_node as robot.launch.py starts it: params file, bundle and backend, camera remap."""
    bundle = make_tiny_bundle(tmp_path / 'bundle', dt=0.05)
    env = ros_env()
    log = tmp_path / 'node.log'
    cmd = [
        str(NODE_DIR / 'policy_node'),
        '--ros-args',
        '--params-file',
        str(ROBOT_YAML),
        '-p',
        f'bundle:={bundle}',
        '-p',
        'backend:=litert',
        '-r',
        'image:=/camera/image_raw',
    ]
    rgb = np.random.default_rng(3).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    with graph(int(env['ROS_DOMAIN_ID'])) as g, running(cmd, env, log) as proc:
        outputs = g.collect(PolicyOutput, '/policy_node/output')
        pub = g.publisher(Image, '/camera/image_raw')
        assert g.wait_matched(pub), log.read_text()
        deadline = time.monotonic() + 10
        while not outputs.snapshot() and time.monotonic() < deadline:
            msg = Image(**image.encode_image_fields(rgb))
            msg.header.stamp = g.node.get_clock().now().to_msg()
            pub.publish(msg)
            outputs.wait_for(lambda got: bool(got), 0.5)
        assert outputs.snapshot(), log.read_text()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    assert 'waiting for frames on /camera/image_raw (Image)' in log.read_text()


def test_launch_description_when_launch_ros_is_available():
    pytest.importorskip('launch_ros', reason='launch_ros comes with a ROS install, not PyPI')
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument
    from launch_ros.actions import Node

    # Each launch file: the arguments it must declare and the nodes it starts.
    expected = {
        'robot.launch.py': ({'bundle', 'backend', 'camera_topic', 'params_file'}, 2),
        'sim.launch.py': ({'bundle', 'backend', 'reset_every_frame', 'params_file'}, 3),
    }
    assert {p.name for p in launch_files()} == set(expected)
    for path in launch_files():
        spec = importlib.util.spec_from_file_location(path.stem.replace('.', '_'), path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        description = module.generate_launch_description()
        assert isinstance(description, LaunchDescription)
        entities = description.entities
        arguments = {e.name for e in entities if isinstance(e, DeclareLaunchArgument)}
        wanted_arguments, nodes = expected[path.name]
        assert wanted_arguments <= arguments, path.name
        assert sum(isinstance(e, Node) for e in entities) == nodes, path.name
