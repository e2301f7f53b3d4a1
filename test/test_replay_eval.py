"""malpi-ros replay-eval: a recording through the installed policy_node, checked against evaluate.

The recording has two episodes (a pause longer than the episode gap between them) and one
undecodable frame, which evaluation skips and the replay must not send. The bundle is the tiny
random-weight one of modelfactory (24x32 input, the default action table of the synthetic
drive): its actions are no good, but deterministic and state-dependent, so "the node does what
evaluate does on every frame" is a demand that can fail.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from bagfactory import synthetic_drive, write_bag
from rosbags.highlevel import AnyReader
from support import NODE_DIR, ros_env, running, stop, wait_for

from malpi_ros.learn.evaluate import evaluate_bundle

pytestmark = pytest.mark.ros

MALPI_ROS = str(NODE_DIR / 'malpi-ros')
NS = '/replay_eval'
FIRST, SECOND = 40, 30  # frames of the two episodes


@pytest.fixture(scope='module')
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from modelfactory import make_tiny_bundle  # TensorFlow: only for this module's fixture

    root = tmp_path_factory.mktemp('replay_eval')
    one = synthetic_drive(FIRST, seed=0, start=1000.0)
    two = synthetic_drive(SECOND, seed=1, start=1010.0)  # 6 s pause: a new episode
    frames = one.frames + two.frames
    frames[10] = (frames[10][0], frames[10][1], {'encoding': 'bogus'})  # evaluation skips it
    bag = write_bag(root / 'drive', frames=frames, commands=one.commands + two.commands)
    return {'bag': bag, 'bundle': make_tiny_bundle(root / 'bundle'), 'root': root}


def replay(args: list[str], env: dict[str, str], timeout: float = 120):
    return subprocess.run(
        [MALPI_ROS, 'replay-eval', *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def read_run_bag(path: Path) -> dict[str, list]:
    """topic -> [(receive ns, message)] of the run bag, read with rosbags alone."""
    got: dict[str, list] = {}
    with AnyReader([path]) as reader:  # the bag's own message definitions: PolicyOutput too
        for conn, t_ns, raw in reader.messages():
            got.setdefault(conn.topic, []).append((t_ns, reader.deserialize(raw, conn.msgtype)))
    return got


def stamp_ns(msg) -> int:
    return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


def test_lockstep_node_actions_equal_evaluate_on_every_frame(data):
    out = data['root'] / 'run'
    done = replay([str(data['bundle']), str(data['bag']), '--out', str(out)], ros_env())
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads((out / 'report.json').read_text())
    t = report['totals']
    frames = FIRST + SECOND - 1
    assert (t['image_messages'], t['frames'], t['not_evaluated']) == (FIRST + SECOND, frames, 1)
    assert (t['played'], t['stepped'], t['skipped'], t['not_played']) == (frames, frames, 0, 0)
    assert t['offline_agreement'] == 1.0 and t['differences'] == 0
    assert t['commands_received'] >= frames
    assert report['interrupted'] is False
    episodes = report['episodes']
    assert [e['frames'] for e in episodes] == [FIRST - 1, SECOND]
    for e in episodes:
        assert e['frames'] == e['played'] + e['not_played']
        assert e['played'] == e['stepped'] + e['skipped']
        assert e['latency_ms']['p50'] is not None and e['latency_ms']['p50'] > 0
    assert sum(e['frames'] for e in episodes) == t['frames']
    assert (out / 'actions.png').read_bytes()[:4] == b'\x89PNG'
    assert 'node vs evaluate 100.0%' in done.stdout

    # Independently of the report: the recorded outputs against evaluate run here.
    evaluation = evaluate_bundle(data['bundle'], [data['bag']], parity=False)
    expected = {}
    for ep in evaluation.episodes:
        for i, (t_s, action) in enumerate(zip(ep.stamps, ep.actions, strict=True)):
            expected[round(float(t_s) * 1e9)] = (int(action), i + 1)
    run = read_run_bag(out / 'run_bag')
    assert set(run) == {f'{NS}/cmd_vel', f'{NS}/policy_node/output'}
    outputs = [msg for _, msg in run[f'{NS}/policy_node/output']]
    assert len(outputs) == frames
    got = {}
    for msg in outputs:
        stamp = min(expected, key=lambda s, m=msg: abs(s - stamp_ns(m)))  # float s -> ns
        assert abs(stamp - stamp_ns(msg)) < 1000
        got[stamp] = (int(msg.action), int(msg.step))
    assert got == expected  # same action, and stepped from a reset at each episode start
    commands = [msg for _, msg in run[f'{NS}/cmd_vel']]
    assert len(commands) >= frames
    last = commands[-1]
    assert (last.linear.x, last.angular.z) == (0.0, 0.0)  # the node's stop on shutdown


def test_sigint_during_a_realtime_replay_exits_cleanly_with_a_readable_run_bag(data, tmp_path):
    out = tmp_path / 'run'
    log = tmp_path / 'replay.log'
    cmd = [MALPI_ROS, 'replay-eval', str(data['bundle']), str(data['bag'])]
    with running([*cmd, '--out', str(out), '--realtime'], ros_env(), log) as proc:
        assert wait_for(lambda: 'replaying' in log.read_text() or proc.poll() is not None, 60)
        assert proc.poll() is None, log.read_text()
        time.sleep(1.5)  # ~15 frames of the 7 s recording
        sent = time.monotonic()
        code = stop(proc, timeout=30)
        stopped_in = time.monotonic() - sent
    text = log.read_text()
    assert code == 130, text[-3000:]
    assert stopped_in < 15
    report = json.loads((out / 'report.json').read_text())
    t = report['totals']
    assert report['interrupted'] is True
    assert 0 < t['played'] < t['frames']
    assert t['played'] == t['stepped'] + t['skipped']
    assert t['frames'] == t['played'] + t['not_played']
    # Realtime at the recorded 10 Hz: the dt gate lets most frames through (jitter on a loaded
    # machine may bring two frames closer than 0.8 dt; those are listed as skipped).
    assert t['stepped'] >= t['played'] / 2
    reasons = set(t['difference_reasons'])
    assert reasons <= {'skipped', 'late', 'missing', 'after_skip'}, reasons
    run = read_run_bag(out / 'run_bag')  # closed properly: opens and reads to the end
    outputs = run[f'{NS}/policy_node/output']
    assert t['stepped'] <= len(outputs) <= t['played']
    assert np.all(np.diff([ns for ns, _ in outputs]) >= 0)


def test_missing_and_wrong_topics_are_named_before_anything_starts(data, tmp_path):
    env = ros_env()
    bundle, bag = str(data['bundle']), str(data['bag'])
    done = replay(
        [bundle, bag, '--out', str(tmp_path / 'a'), '--image-topic', '/camera/depth'], env
    )
    assert done.returncode == 1
    assert 'no image topic /camera/depth' in done.stderr
    assert '/camera/image_raw: sensor_msgs/msg/Image (70)' in done.stderr  # what the bag has
    done = replay([bundle, bag, '--out', str(tmp_path / 'b'), '--image-topic', '/cmd_vel'], env)
    assert done.returncode == 1
    assert 'image topic /cmd_vel is geometry_msgs/msg/Twist' in done.stderr
    taken = tmp_path / 'c'
    taken.mkdir()
    (taken / 'keep.txt').write_text('mine')
    done = replay([bundle, bag, '--out', str(taken)], env)
    assert done.returncode == 1 and 'not overwriting' in done.stderr
    assert (taken / 'keep.txt').read_text() == 'mine'
