"""malpi-ros record: a live publisher in another process, recorded by the installed executable.

Each test runs on a ROS graph of its own (support.ros_env: own ROS_DOMAIN_ID, localhost
discovery). The publisher waits until the recorder has subscribed to both topics before it
sends, so "frame for frame" is a fair demand even over best-effort QoS.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_typestore
from support import NODE_DIR, ros_env, running, small_disk, stop, wait_for

from malpi_ros.bagio import reader as bagio
from malpi_ros.runtime.image import decode

pytestmark = pytest.mark.ros

MALPI_ROS = str(NODE_DIR / 'malpi-ros')
STORE = get_typestore(Stores.ROS2_KILTED)
H, W, N = 24, 32, 30

# Publishes N Image frames (best effort, sensor data) and N Twists (reliable) at 50 Hz once a
# subscriber has matched both, then prints 'done' and idles until SIGINT.
PUBLISHER = f"""
import sys, time
import numpy as np
import rclpy
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from geometry_msgs.msg import Twist
from rclpy.signals import SignalHandlerOptions

H, W, N = {H}, {W}, {N}
wait = len(sys.argv) < 2 or sys.argv[1] != 'nowait'
rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
node = rclpy.create_node('fake_camera')
images = node.create_publisher(Image, 'camera/image_raw', qos_profile_sensor_data)
cmds = node.create_publisher(Twist, 'cmd_vel', 10)
try:
    deadline = time.monotonic() + 30
    while wait and (images.get_subscription_count() < 1 or cmds.get_subscription_count() < 1):
        if time.monotonic() > deadline:
            sys.exit('no subscriber matched')
        time.sleep(0.02)
    time.sleep(0.3)  # let the matching settle on both sides
    print('matched', flush=True)
    i = 0
    while wait is False or i < N:
        n = i % N
        frame = ((np.arange(H * W * 3) + 7 * n) % 256).astype(np.uint8)
        msg = Image(height=H, width=W, encoding='rgb8', step=W * 3)
        msg.header.stamp.sec = 1000 + n
        msg.header.frame_id = 'camera'
        msg.data = frame.tobytes()
        images.publish(msg)
        twist = Twist()
        twist.linear.x = 0.01 * n
        twist.angular.z = -0.02 * n
        cmds.publish(twist)
        i += 1
        time.sleep(0.02)
    print('done', flush=True)
    while True:
        time.sleep(0.1)
except KeyboardInterrupt:
    pass
finally:
    node.destroy_node()
    rclpy.try_shutdown()
"""


def expected_frame(n: int) -> np.ndarray:
    return ((np.arange(H * W * 3) + 7 * n) % 256).astype(np.uint8).reshape(H, W, 3)


def _lines(path: Path) -> str:
    return path.read_text() if path.exists() else ''


def test_records_a_live_publisher_frame_for_frame_and_stops_cleanly_on_sigint(tmp_path):
    env = ros_env()
    out = tmp_path / 'recorded'
    pub_log, rec_log = tmp_path / 'publisher.log', tmp_path / 'record.log'
    record_cmd = [MALPI_ROS, 'record', '--out', str(out)]
    record_cmd += ['--topics', '/camera/image_raw', 'cmd_vel']
    recorder = subprocess.Popen(
        record_cmd, env=env, stdout=rec_log.open('w'), stderr=subprocess.STDOUT, text=True
    )
    try:
        # The recorder starts first and waits for the topics to appear.
        with running([sys.executable, '-c', PUBLISHER], env, pub_log) as publisher:
            finished = wait_for(
                lambda: 'done' in _lines(pub_log) or recorder.poll() is not None, 60
            )
            assert finished and recorder.poll() is None, (
                f'publisher did not finish:\n{_lines(pub_log)}\nrecorder:\n{_lines(rec_log)}'
            )
            time.sleep(1.0)  # the last messages reach the recorder
            assert publisher.poll() is None
            code = stop(recorder)
    finally:
        stop(recorder)
    log = _lines(rec_log)
    assert code == 0, log
    assert 'SIGINT: stopped' in log, log

    # rosbags reads it: every frame and command, in order, bytes as published.
    with AnyReader([out], default_typestore=STORE) as reader:
        by_topic = {c.topic: c for c in reader.connections}
        assert set(by_topic) == {'/camera/image_raw', '/cmd_vel'}
        assert by_topic['/camera/image_raw'].msgtype == 'sensor_msgs/msg/Image'
        assert by_topic['/cmd_vel'].msgtype == 'geometry_msgs/msg/Twist'
        images, twists, stamps = [], [], []
        for conn, t_ns, raw in reader.messages():
            msg = reader.deserialize(raw, conn.msgtype)
            stamps.append(t_ns)
            if conn.topic == '/camera/image_raw':
                images.append(msg)
            else:
                twists.append(msg)
    assert len(images) == N, log
    assert len(twists) == N, log
    assert stamps == sorted(stamps)
    for n, msg in enumerate(images):
        assert msg.header.stamp.sec == 1000 + n
        assert (msg.height, msg.width, msg.encoding) == (H, W, 'rgb8')
        np.testing.assert_array_equal(decode(msg), expected_frame(n))
    np.testing.assert_allclose([t.linear.x for t in twists], 0.01 * np.arange(N))
    np.testing.assert_allclose([t.angular.z for t in twists], -0.02 * np.arange(N))

    # ... and so does the package's own reader, which training uses.
    with bagio.open_bag(out) as bag:
        topics = bagio.find_topics(bag)
        assert topics == ('/camera/image_raw', 'raw', '/cmd_vel', 'twist')
        frames = [decode(m) for _, m in bag.messages('/camera/image_raw', stamp='header')]
    assert len(frames) == N
    for n, frame in enumerate(frames):
        np.testing.assert_array_equal(frame, expected_frame(n))

    # metadata.yaml names the types, their RIHS01 hashes (the Kilted definitions) and the
    # publishers' QoS: an image topic offered best effort, commands reliable.
    meta = yaml.safe_load((out / 'metadata.yaml').read_text())['rosbag2_bagfile_information']
    assert meta['storage_identifier'] == 'mcap'
    assert meta['message_count'] == 2 * N
    entries = {e['topic_metadata']['name']: e for e in meta['topics_with_message_count']}
    image_meta = entries['/camera/image_raw']['topic_metadata']
    assert entries['/camera/image_raw']['message_count'] == N
    assert image_meta['type'] == 'sensor_msgs/msg/Image'
    assert image_meta['type_description_hash'] == STORE.hash_rihs01('sensor_msgs/msg/Image')
    assert image_meta['type_description_hash'].startswith('RIHS01_')
    cmd_meta = entries['/cmd_vel']['topic_metadata']
    assert cmd_meta['type_description_hash'] == STORE.hash_rihs01('geometry_msgs/msg/Twist')
    image_qos, cmd_qos = image_meta['offered_qos_profiles'], cmd_meta['offered_qos_profiles']
    assert image_qos[0]['reliability'] == 'best_effort'
    assert cmd_qos[0]['reliability'] == 'reliable'
    # The summary names what was recorded, and how.
    assert f'/camera/image_raw: sensor_msgs/msg/Image x{N} (best_effort)' in log
    assert f'/cmd_vel: geometry_msgs/msg/Twist x{N} (reliable)' in log


def test_duration_stops_by_itself_and_the_bag_is_valid(tmp_path):
    env = ros_env()
    out = tmp_path / 'timed'
    pub_log = tmp_path / 'publisher.log'
    cmd = [MALPI_ROS, 'record', '--out', str(out), '--topics', '/cmd_vel', '/never/published']
    # 6 s: on a loaded machine discovery can take most of a shorter run (seen: 7 messages in 3 s).
    cmd += ['--duration', '6', '--storage', 'sqlite3']
    with running([sys.executable, '-c', PUBLISHER, 'nowait'], env, pub_log):
        started = time.monotonic()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert 6.0 <= elapsed < 40, elapsed
    assert '/never/published: never published while recording' in done.stdout
    assert (out / 'metadata.yaml').exists()
    assert list(out.glob('*.db3'))
    with AnyReader([out], default_typestore=STORE) as reader:
        assert [c.topic for c in reader.connections] == ['/cmd_vel']
        values = [
            reader.deserialize(raw, conn.msgtype).linear.x for conn, _, raw in reader.messages()
        ]
    # The publisher loops over n = 0..N-1 at 50 Hz: a run of consecutive commands arrived.
    assert len(values) >= 20, len(values)
    steps = np.round(np.diff(values) / 0.01).astype(int) % N
    assert set(steps.tolist()) <= {1}, values


def test_sigterm_stops_it_like_ctrl_c(tmp_path):
    env = ros_env()
    out, rec_log = tmp_path / 'terminated', tmp_path / 'record.log'
    cmd = [MALPI_ROS, 'record', '--out', str(out), '--topics', '/cmd_vel']
    with running([sys.executable, '-c', PUBLISHER, 'nowait'], env, tmp_path / 'pub.log'):
        recorder = subprocess.Popen(
            cmd, env=env, stdout=rec_log.open('w'), stderr=subprocess.STDOUT, text=True
        )
        try:
            assert wait_for(lambda: 'recording /cmd_vel (' in _lines(rec_log), 30), _lines(rec_log)
            time.sleep(0.5)
            recorder.send_signal(signal.SIGTERM)
            code = recorder.wait(15)
        finally:
            stop(recorder)
    assert code == 0, _lines(rec_log)
    assert 'SIGTERM: stopped' in _lines(rec_log)
    with AnyReader([out], default_typestore=STORE) as reader:
        assert sum(1 for _ in reader.messages()) > 5


def test_recorder_api_in_process_records_a_custom_message_type(tmp_path):
    """The Python API (replay-eval's way), with our own PolicyOutput message: its definition
    comes from the installed package's share/ directory, not from the typestore."""
    from rosgraph import graph

    from malpi_ros.msg import PolicyOutput
    from malpi_ros.nodes.record_node import Recorder

    env = ros_env()
    domain = int(env['ROS_DOMAIN_ID'])
    out = tmp_path / 'outputs'
    with graph(domain) as g:
        pub = g.publisher(PolicyOutput, '/policy_node/output')
        with Recorder(out, ['/policy_node/output'], domain_id=domain) as recorder:
            assert recorder.wait_for_topics(15)
            assert g.wait_matched(pub)
            time.sleep(0.3)
            for i in range(5):
                msg = PolicyOutput(action=i % 3, action_name=f'a{i}', step=i + 1)
                msg.probabilities = [0.5, 0.25, 0.25]
                pub.publish(msg)
            assert wait_for(lambda: recorder.counts().get('/policy_node/output') == 5, 10)
        summary = recorder.summary
    assert summary is not None and summary.messages == 5
    with AnyReader([out], default_typestore=STORE) as reader:
        (conn,) = reader.connections
        assert conn.msgtype == 'malpi_ros/msg/PolicyOutput'
        got = [reader.deserialize(raw, conn.msgtype) for _, _, raw in reader.messages()]
    assert [m.step for m in got] == [1, 2, 3, 4, 5]
    assert [m.action_name for m in got] == [f'a{i}' for i in range(5)]
    np.testing.assert_allclose(got[0].probabilities, [0.5, 0.25, 0.25])
    share = Path(sys.prefix) / 'share' / 'malpi_ros' / 'msg' / 'PolicyOutput.json'
    assert conn.digest in share.read_text()  # the hash rosidl generated for the type


def test_an_existing_output_is_refused_and_left_alone(tmp_path):
    out = tmp_path / 'exists'
    out.mkdir()
    (out / 'keep.txt').write_text('mine')
    done = subprocess.run(
        [MALPI_ROS, 'record', '--out', str(out), '--topics', '/x', '--duration', '1'],
        env=ros_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f'output bag {out} exists already' in done.stderr
    assert (out / 'keep.txt').read_text() == 'mine'


def test_a_bad_topic_name_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from malpi_ros.cli import main

    monkeypatch.setenv('ROS_DOMAIN_ID', ros_env()['ROS_DOMAIN_ID'])
    code = main(['record', '--out', str(tmp_path / 'bag'), '--topics', 'bad topic!'])
    assert code == 1
    assert "not a valid topic name: 'bad topic!'" in capsys.readouterr().err
    assert not (tmp_path / 'bag').exists()  # nothing half-made left behind


# -- recordings that survive ---------------------------------------------------------------------


def _read_all(bag):
    with bagio.open_bag(bag) as opened:
        return [(topic, t_ns) for topic, t_ns, _ in opened.raw_messages()]


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_sigkill_mid_recording_then_recover_gives_back_the_messages(tmp_path, storage, capsys):
    """kill -9 after the publisher is done: the open file was flushed (about every second),
    so recover rebuilds it; the bag is named like a ROS 1 one (drive.bag), and opens."""
    from malpi_ros.cli import main

    env = ros_env()
    out, rec_log, pub_log = tmp_path / 'drive.bag', tmp_path / 'rec.log', tmp_path / 'pub.log'
    cmd = [MALPI_ROS, 'record', '--out', str(out), '--storage', storage]
    cmd += ['--topics', '/camera/image_raw', '/cmd_vel']
    recorder = subprocess.Popen(
        cmd, env=env, stdout=rec_log.open('w'), stderr=subprocess.STDOUT, text=True
    )
    try:
        with running([sys.executable, '-c', PUBLISHER], env, pub_log):
            assert wait_for(lambda: 'done' in _lines(pub_log), 60), _lines(rec_log)
            time.sleep(2.5)  # > the flush period, with room for a loaded machine
            recorder.kill()
            recorder.wait(10)
    finally:
        stop(recorder)
    assert main(['inspect', str(out)]) == 1  # unfinished: no metadata.yaml yet
    assert f'malpi-ros recover {out}' in capsys.readouterr().err
    assert main(['recover', str(out)]) == 0
    assert 'messages' in capsys.readouterr().out
    got = _read_all(out)
    images = sum(1 for topic, _ in got if topic == '/camera/image_raw')
    commands = sum(1 for topic, _ in got if topic == '/cmd_vel')
    assert images >= 0.9 * N and commands >= 0.9 * N, (images, commands, _lines(rec_log))
    assert main(['inspect', str(out)]) == 0, capsys.readouterr().err


def test_record_splits_files_and_every_message_reads_back_in_order(tmp_path):
    env = ros_env()
    out, pub_log = tmp_path / 'split', tmp_path / 'pub.log'
    cmd = [MALPI_ROS, 'record', '--out', str(out), '--max-bag-duration', '0.2']
    cmd += ['--topics', '/camera/image_raw', '/cmd_vel']
    publisher = [sys.executable, '-c', PUBLISHER]
    with running(cmd, env, tmp_path / 'rec.log') as recorder, running(publisher, env, pub_log):
        assert wait_for(lambda: 'done' in _lines(pub_log), 60)
        time.sleep(1.0)
        assert stop(recorder) == 0, _lines(tmp_path / 'rec.log')
    meta = yaml.safe_load((out / 'metadata.yaml').read_text())['rosbag2_bagfile_information']
    files = meta['relative_file_paths']
    assert len(files) >= 3 and files[0] == 'split_0.mcap', files
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, 'metadata.yaml'])
    assert meta['message_count'] == 2 * N
    counts = {
        e['topic_metadata']['name']: e['message_count'] for e in meta['topics_with_message_count']
    }
    assert counts == {'/camera/image_raw': N, '/cmd_vel': N}
    with bagio.open_bag(out) as bag:
        frames = [decode(m) for _, m in bag.messages('/camera/image_raw')]
    assert len(frames) == N
    for n, frame in enumerate(frames):
        np.testing.assert_array_equal(frame, expected_frame(n))


def test_a_full_disk_stops_the_recorder_with_one_line_and_a_readable_bag(tmp_path):
    """A real full disk (a 384 KB tmpfs): the recorder stops at the first write error, says so
    in one line, and the bag holds (and says it holds) the closed files."""
    env = ros_env()
    disk = tmp_path / 'disk'
    out = disk / 'bag'
    cmd = [MALPI_ROS, 'record', '--out', str(out), '--max-bag-size', '60000']
    cmd += ['--topics', '/camera/image_raw', '/cmd_vel']
    with small_disk(disk, '384k'):
        with running([sys.executable, '-c', PUBLISHER, 'nowait'], env, tmp_path / 'pub.log'):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        got = _read_all(out)
    assert done.returncode == 1, done.stdout + done.stderr
    assert 'Traceback' not in done.stderr, done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if 'No space' in line]
    assert len(lines) == 1 and 'recording stopped early' in lines[0], done.stdout + done.stderr
    said = int(done.stdout.split(': ', 1)[1].split(' messages')[0])
    assert said == len(got) > 50, (said, len(got), done.stdout)


def test_a_cut_mcap_is_rebuilt_by_recover(tmp_path, capsys):
    """The last 3% of the storage file cut off (its summary and some messages): unreadable,
    until recover reads the messages up to the cut."""
    from bagfactory import mcap_file, synthetic_drive, write_bag

    from malpi_ros.cli import main

    drive = synthetic_drive(400, dt=0.05, seed=2)
    bag = write_bag(tmp_path / 'cut', frames=drive.frames, commands=drive.commands)
    file = mcap_file(bag)
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * 0.97)])
    assert main(['inspect', str(bag)]) == 1
    capsys.readouterr()
    assert main(['recover', str(bag)]) == 0
    assert 'cut.mcap -> cut.mcap' in capsys.readouterr().out
    got = _read_all(bag)
    assert len(got) >= 0.9 * 800, len(got)
    assert main(['inspect', str(bag)]) == 0, capsys.readouterr().err
