"""The demo's pieces on tiny sizes: record the expert, inspect it, train one epoch, drive.

The full ``make demo`` (minutes of training, real-time laps) is not a CI test; this file runs
each of its steps the way it does - the recording in-process, ``malpi-ros inspect`` and
``malpi-ros train`` as installed commands, a closed-loop drive through the real graph (sim_node,
policy_node, motor_driver_node, the recorder) for a few seconds - and checks what they produce.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import subprocess
from datetime import datetime

import numpy as np
import pytest
import yaml
from support import NODE_DIR, SHARE_DIR, ros_env, small_disk

from malpi_ros.bagio import reader as bags
from malpi_ros.config import PreprocessConfig
from malpi_ros.nodes.policy_node_config import PARAMETERS as POLICY_PARAMETERS
from malpi_ros.runtime.image import decode, fit_frame
from malpi_ros.sim import RobotConfig, SimConfig, SimWorld, demo, integrate
from malpi_ros.sim.record import Disturbance, RecordConfig, expert_step, record_expert

CLI = str(NODE_DIR / 'malpi-ros')
SIM_TRAIN = SHARE_DIR / 'config' / 'sim_train.yaml'
SIM_YAML = SHARE_DIR / 'config' / 'nodes' / 'sim.yaml'


@pytest.fixture(scope='module')
def expert_bag(tmp_path_factory):
    """One lap, then two short cue-to-fork drives: ~420 frames, ~2 s to write."""
    path = tmp_path_factory.mktemp('record') / 'expert_bag'
    result = record_expert(path, RecordConfig(episodes=1, laps=1, segments=2, seed=4))
    return path, result


# --- pure --------------------------------------------------------------------------------------


def test_run_dirs_never_clobber(tmp_path):
    now = datetime(2025, 6, 1, 12, 0, 0)
    first = demo.new_run_dir(tmp_path, now)
    second = demo.new_run_dir(tmp_path, now)
    assert first.name == '20250601-120000' and second.name == '20250601-120000-2'
    assert first.is_dir() and second.is_dir()


def test_ros_env_keeps_discovery_local_on_one_domain(monkeypatch):
    monkeypatch.setenv('ROS_DOMAIN_ID', '17')
    env = demo.ros_env()
    assert env['ROS_AUTOMATIC_DISCOVERY_RANGE'] == 'LOCALHOST' and env['ROS_DOMAIN_ID'] == '17'
    assert demo.ros_env(5)['ROS_DOMAIN_ID'] == '5'
    monkeypatch.delenv('ROS_DOMAIN_ID')
    assert demo.ros_env()['ROS_DOMAIN_ID'] == '42'
    with pytest.raises(demo.ConfigError, match='got 300'):
        demo.ros_env(300)


def test_the_demo_starts_the_graph_of_the_launch_file(tmp_path):
    path = SHARE_DIR / 'launch' / 'sim.launch.py'
    spec = importlib.util.spec_from_file_location('sim_launch', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # launch imports live inside generate_launch_description
    assert module.REMAPS == demo.REMAPS
    cfg = demo.DriveConfig(reset_every_frame=True, seed=3)
    cmds = demo.drive_commands(
        tmp_path / 'b', SIM_YAML, tmp_path / 'p.json', tmp_path / 'bag', cfg
    )
    assert list(cmds) == ['record', 'motor_driver_node', 'policy_node', 'sim_node']
    policy = ' '.join(cmds['policy_node'])
    assert f'--params-file {SIM_YAML}' in policy and '-r image:=/camera/image_raw' in policy
    assert '-p reset_every_frame:=true' in policy and f'-p bundle:={tmp_path / "b"}' in policy
    sim = ' '.join(cmds['sim_node'])
    assert '-r wheels:=/motor_driver_node/wheels' in sim and '-p seed:=3' in sim
    assert f'-p progress_file:={tmp_path / "p.json"}' in sim
    # Everything the demo and the launch file pass to policy_node is a declared parameter.
    sections = yaml.safe_load(SIM_YAML.read_text())
    assert set(sections['policy_node']['ros__parameters']) <= set(POLICY_PARAMETERS)
    assert {'bundle', 'backend', 'reset_every_frame'} <= set(POLICY_PARAMETERS)


def fake_result(name, laps, right, forks, off):
    progress = {
        'laps': laps,
        'forks': forks,
        'forks_correct': right,
        'off_track_events': off,
        'mean_speed': 0.321,
        'time': 100.0,
    }
    return demo.DriveResult(
        name,
        progress,
        np.zeros((0, 2)),
        np.array([0.5, 0.6, 0.7, 3.0]),
        np.array([1.0, 2.0]),
        10.0,
        'laps',
    )


def test_the_table_shows_both_drives_side_by_side():
    table = demo.format_table(
        [fake_result('carried', 3, 3, 3, 0), fake_result('ablation', 3, 1, 3, 2)]
    )
    lines = table.splitlines()
    assert 'state carried' in lines[0] and 'reset every frame' in lines[0]
    assert lines[1].split()[-2:] == ['3', '3']
    forks = next(line for line in lines if line.startswith('cued branch'))
    assert '3/3 (100%)' in forks and '1/3 (33%)' in forks
    assert next(line for line in lines if line.startswith('off-track')).split()[-2:] == ['0', '2']
    latency = next(line for line in lines if line.startswith('policy latency'))
    assert f'{np.percentile([0.5, 0.6, 0.7, 3.0], 50):.2f} / ' in latency
    assert not any(line.startswith('offline') for line in lines)
    carried, ablation = fake_result('carried', 3, 3, 3, 0), fake_result('ablation', 3, 1, 3, 0)
    carried.offline = {'laps': 20, 'forks': 20, 'forks_correct': 19, 'off_track_events': 0}
    ablation.offline = {'laps': 20, 'forks': 20, 'forks_correct': 11, 'off_track_events': 1}
    lines = demo.format_table([carried, ablation]).splitlines()
    offline = next(line for line in lines if line.startswith('offline, 20 laps'))
    assert '19/20 (95%)' in offline and '11/20 (55%)' in offline


# --- the steps, tiny ----------------------------------------------------------------------------


def test_the_recording_is_a_bag_inspect_reads_with_the_sim_frames(expert_bag):
    path, result = expert_bag
    assert result.laps == 1 and result.off_track_events == 0 and result.forks == (1, 1)
    out = subprocess.run(
        [CLI, 'inspect', str(path), '--config', str(SIM_TRAIN), '--json'],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=ros_env(),
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    text = json.dumps(report)
    assert '/camera/image_raw' in text and '/cmd_vel' in text and 'rgb8' in text
    assert str(result.frames) in text
    # Frame for frame the simulator's: the first frame is the first render of episode 0.
    world = SimWorld(SimConfig(), seed=4)
    world.reset(4 * 1000)
    with bags.open_bag(path) as bag:
        images = list(bag.messages('/camera/image_raw'))
        headers = [bags.header_stamp(m) for _, m in images]
        commands = list(bag.messages('/cmd_vel'))
    assert len(images) == len(commands) == result.frames
    assert np.array_equal(decode(images[0][1]), world.render())
    # Header stamps are the receive times (sim time), 0.1 s apart within an episode.
    assert [t for t, _ in images] == pytest.approx(headers, abs=1e-6)
    assert np.diff(headers)[:50] == pytest.approx(0.1, abs=1e-6)
    # The first command is what the expert did on the first frame.
    first = world.actions.actions[world.expert_action()]
    assert (commands[0][1].linear.x, commands[0][1].angular.z) == (first.linear_x, first.angular_z)
    # Three episodes: the pauses between them are longer than the dataset's episode gap.
    assert int(np.count_nonzero(np.diff(headers) > 1.0)) == 2


def test_segments_are_one_window_long_and_end_just_past_the_fork(tmp_path):
    cfg = RecordConfig(episodes=0, segments=3, segment_frames=40, seed=9)
    result = record_expert(tmp_path / 'bag', cfg)
    assert result.frames == 120 and len(result.summaries) == 3
    track = SimWorld().track
    for summary in result.summaries:  # where each drive ended: past the fork start, before mid
        assert summary['laps'] == 0 and summary['off_track_events'] == 0
    with bags.open_bag(tmp_path / 'bag') as bag:
        stamps = np.array([t for t, _ in bag.messages('/camera/image_raw')])
    starts = np.flatnonzero(np.diff(stamps) > 1.0) + 1
    assert np.diff([0, *starts, len(stamps)]).tolist() == [40, 40, 40]
    assert track.fork_start < track.decide_s  # (the segment ends before a decision is counted)


def test_two_recording_workers_write_the_same_bag_message_for_message(tmp_path):
    # One lap episode and three drives: worker chunks of 4 episodes split them unevenly.
    cfg = RecordConfig(episodes=1, laps=1, segments=3, segment_frames=20, seed=5,
                       image_format='jpeg')  # fmt: skip
    seen: list[int] = []
    one = record_expert(tmp_path / 'one', cfg)
    two = record_expert(tmp_path / 'two', cfg, workers=2, progress=lambda e, _: seen.append(e))
    assert seen == [0, 1, 2, 3] and one.summaries == two.summaries
    assert one.frames == two.frames > 60
    for topic in ('/camera/image_raw/compressed', '/cmd_vel'):
        with bags.open_bag(tmp_path / 'one') as a, bags.open_bag(tmp_path / 'two') as b:
            first = [(t, bytes(m.data) if hasattr(m, 'data') else repr(m))
                     for t, m in a.messages(topic)]  # fmt: skip
            second = [(t, bytes(m.data) if hasattr(m, 'data') else repr(m))
                      for t, m in b.messages(topic)]  # fmt: skip
        assert first == second and len(first) == one.frames
    with pytest.raises(demo.ConfigError, match='record workers must be an integer >= 1, got 0'):
        record_expert(tmp_path / 'none', cfg, workers=0)


def test_the_recording_step_prints_its_progress_with_the_time_left(tmp_path):
    lines: list[str] = []
    cfg = RecordConfig(episodes=0, segments=4, segment_frames=10, seed=2)
    result = demo.record_step(tmp_path, cfg, lines.append)
    assert (tmp_path / 'expert_bag').is_dir() and result.frames == 40
    counts = [re.match(r'  (\d+)/4 episodes recorded, ~\d+ s left$', line) for line in lines[:-1]]
    assert [int(m.group(1)) for m in counts if m] == [1, 2, 3, 4], lines
    assert lines[-1].startswith('  40 frames (0.1 min of driving) in ')


def test_jpeg_recording_is_image_transports_compressed_topic_of_the_same_frames(tmp_path):
    cfg = RecordConfig(episodes=0, segments=1, segment_frames=12, image_format='jpeg', seed=3)
    record_expert(tmp_path / 'jpeg', cfg)
    record_expert(tmp_path / 'raw', dataclasses.replace(cfg, image_format='raw'))
    with bags.open_bag(tmp_path / 'jpeg') as bag:
        topic = '/camera/image_raw/compressed'
        assert bag.topics[topic] == ('sensor_msgs/msg/CompressedImage', 12)
        jpeg = np.stack([decode(m) for _, m in bag.messages(topic)]).astype(float)
    with bags.open_bag(tmp_path / 'raw') as bag:
        raw = np.stack([decode(m) for _, m in bag.messages('/camera/image_raw')]).astype(float)
    assert jpeg.shape == raw.shape == (12, 120, 160, 3)
    # The same drive, frame for frame; JPEG at quality 90 drops some of the renderer's pixel
    # noise (sigma 3), and after the policy's resize to 40x30 the two are closer still.
    assert 0.2 < np.abs(jpeg - raw).mean() < 4.0
    assert np.abs(raw[0] - raw[-1]).mean() > 2 * np.abs(jpeg - raw).mean()
    small = PreprocessConfig(height=30, width=40)
    fit = [np.stack([fit_frame(f.astype(np.uint8), small) for f in x]).astype(float)
           for x in (jpeg, raw)]  # fmt: skip
    assert np.abs(fit[0] - fit[1]).mean() < 1.2
    with pytest.raises(demo.ConfigError, match="image_format must be one of raw, jpeg, got 'png'"):
        RecordConfig(image_format='png')


def test_a_disturbance_moves_the_robot_but_the_expert_command_is_recorded():
    exact = SimConfig(robot=RobotConfig(wheel_noise=0.0), reset_on_off_track=False)
    world = SimWorld(exact, seed=2)
    calm = Disturbance(RecordConfig(disturb_rate=0.0), world, seed=1)
    assert all(calm.motion(c) == c for c in (1, 2, 3) for _ in range(20))
    shaky = Disturbance(RecordConfig(disturb_rate=0.9, disturb_frames=3), world, seed=1)
    disturbed = 0
    for _ in range(30):
        before = world.pose
        expert = world.expert_action()
        _, command = expert_step(world, shaky)
        assert command == expert  # what the bag records: the expert's command
        moved = [
            integrate(before, a.linear_x, a.angular_z, world.config.dt)
            for a in world.actions.actions
        ]
        # the robot moved as exactly one action moves it; count when that was not the command
        match = [i for i, p in enumerate(moved) if np.allclose(p, world.pose, atol=1e-9)]
        assert len(match) >= 1
        disturbed += command not in match
    assert disturbed >= 10


def test_recording_refuses_an_existing_path_and_bad_settings(tmp_path):
    (tmp_path / 'taken').mkdir()
    with pytest.raises(demo.MalpiError, match='exists'):
        record_expert(tmp_path / 'taken', RecordConfig(episodes=1, laps=1))
    with pytest.raises(demo.ConfigError, match='disturb_rate must be a probability'):
        RecordConfig(disturb_rate=1.5)
    with pytest.raises(demo.ConfigError, match=r'segment_end must be \(low, high\)'):
        RecordConfig(segment_end=(1.0, 0.5))
    with pytest.raises(demo.ConfigError, match='nothing to record'):
        RecordConfig(episodes=0, segments=0)


def test_a_recording_that_fails_leaves_no_bag_and_a_full_disk_is_a_bag_error(tmp_path):
    cfg = RecordConfig(episodes=0, segments=2, segment_frames=10, seed=2)

    def interrupted(episode, _):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # not a write error: it comes out unchanged
        record_expert(tmp_path / 'stopped', cfg, progress=interrupted)
    assert not (tmp_path / 'stopped').exists()
    # 20 raw frames are ~1.2 MB: a 256 KB disk fills while writing or closing.
    with small_disk(tmp_path / 'disk', '256k') as disk:
        with pytest.raises(demo.MalpiError, match=f'cannot write {disk / "bag"}: '):
            record_expert(disk / 'bag', cfg)
        assert not (disk / 'bag').exists()


@pytest.mark.ros
def test_train_one_tiny_epoch_then_drive_the_graph_for_a_few_seconds(expert_bag, tmp_path):
    path, _ = expert_bag
    bundle = tmp_path / 'bundle'
    args = ['train', str(path), '--out', str(bundle), '--config', str(SIM_TRAIN)]
    args += ['--epochs', '1', '--height', '24', '--width', '32', '--verbose', '0']
    args += ['--burn-in', '10', '--seq-len', '10']  # the recipe's 120-frame windows: too long
    train = subprocess.run(
        [CLI, *args], capture_output=True, text=True, timeout=120, check=False, env=ros_env()
    )
    assert train.returncode == 0, train.stdout + train.stderr
    meta = json.loads(next(bundle.glob('*.json')).read_text())
    assert meta['dt'] == pytest.approx(0.1, rel=1e-3)  # the simulator's frame period

    env = ros_env()
    run_dir = demo.new_run_dir(tmp_path / 'runs')
    # 8 s at 10 Hz: 80 frames, of which >= 30 must be stepped even on a busy machine
    cfg = demo.DriveConfig(laps=5, time_limit=8.0, startup_timeout=40.0, seed=2)
    result = demo.drive(run_dir, 'carried', bundle, SIM_YAML, cfg, env, log=lambda _: None)
    logs = {p.name: p.read_text()[-1500:] for p in (run_dir / 'carried' / 'logs').glob('*.log')}
    assert result.stopped_by == 'time limit', (result.notes, logs)
    assert result.progress['started'] and result.progress['steps'] >= 30, result.progress
    assert result.progress['distance'] > 0.3  # the policy's commands moved the robot
    row = result.row()
    assert row['policy_steps'] >= 30 and row['latency_p50_ms'] is not None, (result.notes, logs)
    assert 0 < row['latency_p50_ms'] < 50 and 0 < row['frame_to_output_p50_ms'] < 100
    assert row['max_steps_since_reset'] >= 30  # the state was carried, frame to frame
    assert len(result.trajectory) >= 30
    png = demo.plot(run_dir, [result])
    assert png.stat().st_size > 10_000
    # The same bundle in-process, no ROS: the world steps as fast as the policy answers.
    offline = demo.drive_offline(bundle, laps=1, seed=5, reset_every_frame=True)
    assert offline['steps'] >= 30 and offline['time'] == pytest.approx(offline['steps'] * 0.1)
    assert offline['distance'] > 0.3
