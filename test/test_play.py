"""malpi-ros play: the installed executable publishes a bag; this test process subscribes.

Each test runs on a ROS graph of its own (support.ros_env: own ROS_DOMAIN_ID, localhost
discovery); the subscriber (test/rosgraph.py, its own rclpy Context on that domain) is up before
the player starts, and the player waits for it, so "every message" is a fair demand even for
best-effort images.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from bagfactory import write_bag
from geometry_msgs.msg import Twist
from rclpy.qos import qos_profile_sensor_data
from rosgraph import Inbox, graph
from sensor_msgs.msg import Image
from support import NODE_DIR, ros_env, running, stop

pytestmark = pytest.mark.ros

MALPI_ROS = str(NODE_DIR / 'malpi-ros')
H, W, N = 24, 32, 10
DT = 0.1  # s between frames in the bag; commands come DT/2 after each frame
T0 = 1000.0


def frame(i: int) -> np.ndarray:
    return ((np.arange(H * W * 3) * (i + 1) + 11 * i) % 256).astype(np.uint8).reshape(H, W, 3)


@pytest.fixture(scope='module')
def bags(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp('play_bags')
    frames = [(T0 + DT * i, frame(i)) for i in range(N)]
    commands = [(T0 + DT * i + DT / 2, 0.01 * (i + 1), -0.1 * i) for i in range(N)]
    return {
        storage: write_bag(root / storage, storage=storage, frames=frames, commands=commands)
        for storage in ('mcap', 'sqlite3')
    }


def stamp(msg: Image) -> float:
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9


def arrivals(inbox: Inbox) -> np.ndarray:
    return np.array([r.at for r in inbox.snapshot()])


# On a loaded machine discovery can take over a second, and the subscriber's side of a match
# can lag the player's: wait long for the match, then give the subscriber time to match too.
PATIENT = ['--wait-for-subscribers', '30', '--delay', '1']


def play(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MALPI_ROS, 'play', *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_frames_in_order(images: list[Image], indices: list[int]) -> None:
    assert [round((stamp(m) - T0) / DT) for m in images] == indices
    for msg, i in zip(images, indices, strict=True):
        assert (msg.height, msg.width, msg.encoding) == (H, W, 'rgb8')
        assert bytes(msg.data) == frame(i).tobytes()  # the stored bytes, untouched


def test_rate_1_every_message_in_order_with_the_recorded_timing_and_remap(bags):
    env = ros_env()
    with graph(int(env['ROS_DOMAIN_ID'])) as g:
        images = g.collect(Image, '/camera/image_raw', qos_profile_sensor_data)
        cmds = g.collect(Twist, '/remapped_cmd')
        plain = g.collect(Twist, '/cmd_vel')
        done = play([str(bags['mcap']), '--remap', '/cmd_vel:=/remapped_cmd', *PATIENT], env)
        assert done.returncode == 0, done.stderr
        assert images.wait_for(lambda got: len(got) >= N, 5), done.stderr
        assert cmds.wait_for(lambda got: len(got) >= N, 5), done.stderr
        time.sleep(0.2)  # nothing more may come
        assert len(images.snapshot()) == N and len(cmds.snapshot()) == N
        assert plain.snapshot() == []  # remapped away from its recorded name

    assert_frames_in_order(images.messages(), list(range(N)))
    assert [round(m.linear.x * 100) for m in cmds.messages()] == list(range(1, N + 1))
    assert [round(m.angular.z * 10) for m in cmds.messages()] == [-i for i in range(N)]

    # Timing: frames DT apart, each command DT/2 after its frame (tolerance for a busy machine).
    t_img, t_cmd = arrivals(images), arrivals(cmds)
    gaps = np.diff(t_img)
    assert abs(np.median(gaps) - DT) < 0.01, gaps
    assert np.all(np.abs(gaps - DT) < 0.05), gaps
    assert abs((t_img[-1] - t_img[0]) - DT * (N - 1)) < 0.05
    assert np.all(np.abs(t_cmd - t_img - DT / 2) < 0.05), t_cmd - t_img
    assert f'{2 * N} messages published' in done.stdout, done.stdout
    assert 'into the bag' in done.stderr  # the progress line


def test_rate_2_plays_twice_as_fast_a_window_of_one_topic_from_sqlite3(bags):
    env = ros_env()
    with graph(int(env['ROS_DOMAIN_ID'])) as g:
        images = g.collect(Image, '/camera/image_raw', qos_profile_sensor_data)
        cmds = g.collect(Twist, '/cmd_vel')
        # The window 0.15..0.65 s holds frames 2..6 (frames are at 0.0, 0.1, ... 0.9 s).
        args = [str(bags['sqlite3']), '--rate', '2', '--topics', '/camera/image_raw']
        done = play([*args, '--start', '0.15', '--duration', '0.5', *PATIENT], env)
        assert done.returncode == 0, done.stderr
        assert images.wait_for(lambda got: len(got) >= 5, 5), done.stderr
        time.sleep(0.2)
        assert cmds.snapshot() == []  # not asked for

    assert_frames_in_order(images.messages(), [2, 3, 4, 5, 6])
    gaps = np.diff(arrivals(images))
    assert abs(np.median(gaps) - DT / 2) < 0.01, gaps
    assert np.all(np.abs(gaps - DT / 2) < 0.04), gaps


def test_a_topic_the_bag_lacks_is_named_with_what_the_bag_has(bags):
    done = play([str(bags['mcap']), '--topics', '/camera/depth'], ros_env())
    assert done.returncode == 1
    assert '/camera/depth' in done.stderr
    assert '/camera/image_raw: sensor_msgs/msg/Image (10)' in done.stderr
    assert '/cmd_vel: geometry_msgs/msg/Twist (10)' in done.stderr


def test_bad_options_are_refused_before_anything_is_published(bags):
    done = play([str(bags['mcap']), '--remap', 'cmd_vel'], ros_env())
    assert done.returncode == 1 and 'FROM:=TO' in done.stderr and "'cmd_vel'" in done.stderr
    done = play([str(bags['mcap']), '--start', '5'], ros_env())
    assert done.returncode == 1 and 'past the end' in done.stderr
    done = play([str(bags['mcap']), '--rate', '0'], ros_env())
    assert done.returncode == 2 and "--rate: must be > 0, got '0'" in done.stderr


def test_loop_repeats_the_bag_until_sigint_then_exits_cleanly(bags, tmp_path):
    env = ros_env()
    log = tmp_path / 'play.log'
    with graph(int(env['ROS_DOMAIN_ID'])) as g:
        images = g.collect(Image, '/camera/image_raw', qos_profile_sensor_data)
        cmd = [MALPI_ROS, 'play', str(bags['mcap']), '--loop', '--topics', '/camera/image_raw']
        cmd += PATIENT
        with running(cmd, env, log) as proc:
            assert images.wait_for(lambda got: len(got) >= 2 * N + 3, 15), log.read_text()
            assert proc.poll() is None  # still looping
            sent = time.monotonic()
            code = stop(proc)
            stopped_in = time.monotonic() - sent
    text = log.read_text()
    assert code == 0, text
    assert stopped_in < 3.0
    assert 'interrupted' in text and 'passes' in text, text
    got = images.messages()
    indices = [round((stamp(m) - T0) / DT) for m in got]
    assert indices == [i % N for i in range(len(got))]  # pass after pass, in order
    # The seam keeps the rhythm: the first frame of pass 2 comes one frame period after the last.
    seam = arrivals(images)[N] - arrivals(images)[N - 1]
    assert abs(seam - DT) < 0.05, seam


def test_no_subscriber_still_plays_after_the_wait(bags):
    env = ros_env()
    started = time.monotonic()
    done = play([str(bags['mcap']), '--wait-for-subscribers', '0.3', '--rate', '5'], env)
    assert done.returncode == 0, done.stderr
    assert 'had no subscriber' in done.stdout
    assert f'{2 * N} messages published' in done.stdout
    assert time.monotonic() - started < 20
