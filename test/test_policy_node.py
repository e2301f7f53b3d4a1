"""policy_node as installed, in its own process, fed camera frames over a real DDS graph.

The test joins the node's domain with ``rosgraph.graph``, publishes ``image`` and reads
``cmd_vel``, ``~/output`` and ``/diagnostics``. What the node must say is computed offline from
the same bundle: ``Policy.step`` on ``image.decode`` of the very messages sent, so the node and
the offline runtime must agree step for step. Frames are sent one at a time, each after the
previous output arrived and at least ``dt`` later by stamp, so the node's depth-1 subscription
never drops one and its dt gate never skips one unless a test wants it to.
"""

from __future__ import annotations

import json
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest
from bagfactory import zero_png
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import Twist
from modelfactory import make_tiny_bundle
from rosgraph import Graph, graph
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CompressedImage, Image
from std_srvs.srv import SetBool, Trigger
from support import NODE_DIR, ros_env, running, stop, wait_for

from malpi_ros.msg import AppliedCommand, PolicyOutput
from malpi_ros.runtime import image
from malpi_ros.runtime.actions import ActionSelector, twist_for
from malpi_ros.runtime.policy import Policy, StepResult

pytestmark = pytest.mark.ros

NODE = str(NODE_DIR / 'policy_node')
OUTPUT = '/policy_node/output'
DT = 0.05  # the tiny bundle's frame period: frames are paced a little slower than this
STOP_AFTER = 0.5
RESET_AFTER_GAP = 3.0  # long: a loaded machine may take a second between two checked steps
# The module's node: a generous max_frame_age so a re-sent frame (same stamp) still counts,
# frequent diagnostics so tests need not wait long for a report.
NODE_PARAMS = {
    'stop_after': STOP_AFTER,
    'reset_after_gap': RESET_AFTER_GAP,
    'max_frame_age': 2.0,
    'diagnostics_period': 0.25,
}


def ros_args(bundle: Path, **params: Any) -> list[str]:
    params = {'diagnostics_period': 0.25, **params}  # Rig waits for the first report
    args = [NODE, '--ros-args', '-p', f'bundle:={bundle}']
    for name, value in params.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        args += ['-p', f'{name}:={text}']
    return args


def fields(rgb: np.ndarray, encoding: str = 'rgb8') -> dict[str, Any]:
    return image.encode_image_fields(rgb, encoding)


def offline(
    bundle: Path, messages: list[dict[str, Any]], backend='litert', selector=None
) -> list[StepResult]:
    """What a fresh policy gives for these messages, decoded as the node decodes them."""
    policy = Policy.from_bundle(bundle, backend, selector=selector)
    return [policy.step(image.decode(SimpleNamespace(**m))) for m in messages]


def stamp_key(stamp: Any) -> tuple[int, int]:
    return (stamp.sec, stamp.nanosec)


def twist_of(msg: Twist) -> tuple[float, float]:
    return (msg.linear.x, msg.angular.z)


class Rig:
    """A running policy_node and the test's end of its graph: publish frames, call services."""

    def __init__(
        self,
        g: Graph,
        proc: subprocess.Popen[str],
        log: Path,
        env: dict[str, str],
        compressed=False,
    ):
        self.g, self.proc, self.log = g, proc, log
        self.env = env  # for other processes joining the graph
        self.cmd = g.collect(Twist, 'cmd_vel')
        self.out = g.collect(PolicyOutput, OUTPUT)
        self.diag = g.collect(DiagnosticArray, '/diagnostics')
        self.pub = g.publisher(CompressedImage if compressed else Image, 'image')
        self.reset_srv = g.node.create_client(Trigger, '/policy_node/reset')
        self.enable_srv = g.node.create_client(SetBool, '/policy_node/enable')
        self.last_stamp = 0.0
        assert g.wait_matched(self.pub, timeout=60), f'no image subscriber:\n{self.text()}'
        # A report on /diagnostics proves the node's writers matched our readers: they were
        # announced in this order (cmd_vel, output, diagnostics) on one reliable discovery
        # stream, so the node knew the first two before the third. Without this wait the
        # first output was lost once in a few runs (a reliable writer skips unknown readers).
        assert self.diag.wait_for(bool, 15.0), f'no /diagnostics:\n{self.text()}'

    def text(self) -> str:
        return self.log.read_text()

    def send(self, msg_fields: dict[str, Any], stamp: float | None = None, via=None) -> Any:
        """Publish one frame stamped ``stamp`` (default: now, >= 1.1 dt after the last).

        ``via``: another publisher's ``publish`` (e.g. ``LargeFramePublisher``), default ours.
        """
        if stamp is None:
            stamp = max(time.time(), self.last_stamp + 1.1 * DT)
            while time.time() < stamp:  # never stamp a frame in the future
                time.sleep(0.002)
            self.last_stamp = stamp
        msg = CompressedImage() if 'format' in msg_fields else Image()
        for name, value in msg_fields.items():
            setattr(msg, name, value)
        msg.header.frame_id = 'camera'
        msg.header.stamp.sec = int(stamp)
        msg.header.stamp.nanosec = round((stamp - int(stamp)) * 1e9) % 1_000_000_000
        (via or self.pub.publish)(msg)
        return msg

    def step(self, msg_fields: dict[str, Any], timeout=10.0, via=None) -> tuple[Any, PolicyOutput]:
        """Send a frame and wait for its output (re-sent unchanged if it got lost)."""
        msg = self.send(msg_fields, via=via)
        key = stamp_key(msg.header.stamp)

        def arrived(got: list) -> bool:
            return any(stamp_key(r.msg.header.stamp) == key for r in got)

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.out.wait_for(arrived, 0.5):
                found = [m for m in self.out.messages() if stamp_key(m.header.stamp) == key]
                assert len(found) == 1, f'{len(found)} outputs for one frame'
                return msg, found[0]
            (via or self.pub.publish)(msg)  # same stamp: stepped at most once (gate drops repeats)
        raise AssertionError(f'no output for the frame stamped {key}:\n{self.text()}')

    def steps(self, messages: list[dict[str, Any]]) -> list[tuple[PolicyOutput, Twist | None]]:
        """Step frames in order; for each its output and the cmd_vel published for it."""
        results = []
        for m in messages:
            before = len(self.cmd.snapshot())
            _, out = self.step(m)
            cmd = None
            if out.enabled:
                assert self.cmd.wait_for(lambda got, n=before: len(got) > n, 5.0)
                cmd = self.cmd.messages()[before]
            results.append((out, cmd))
        return results

    def call(self, client: Any, request: Any) -> tuple[Any, float]:
        """A service call and its round-trip time (s)."""
        assert client.wait_for_service(timeout_sec=10), f'no service:\n{self.text()}'
        start = time.monotonic()
        future = client.call_async(request)
        assert wait_for(future.done, 5.0, interval=0.001), 'service did not answer'
        return future.result(), time.monotonic() - start

    def reset(self) -> tuple[Trigger.Response, float]:
        return self.call(self.reset_srv, Trigger.Request())

    def enable(self, on: bool) -> tuple[SetBool.Response, float]:
        return self.call(self.enable_srv, SetBool.Request(data=on))

    def fresh(self) -> None:
        """Enabled, zero state, empty inboxes: each test starts from here.

        Disabling first disarms the stop timer (and its zero is awaited), so no zero Twist
        for silence after the previous test can land amid this test's commands.
        """
        before = len(self.cmd.snapshot())
        assert self.enable(False)[0].success
        assert self.cmd.wait_for(lambda got: len(got) > before, 5.0)
        response, _ = self.enable(True)
        assert response.success
        for inbox in (self.cmd, self.out, self.diag):
            inbox.clear()

    def statuses(self) -> list[DiagnosticStatus]:
        return [s for a in self.diag.messages() for s in a.status if s.name.startswith('policy')]

    def wait_status(self, predicate, timeout: float = 5.0) -> DiagnosticStatus:
        """The first policy_node status (from now on) for which predicate(values dict) holds."""
        skip = len(self.statuses())

        def found() -> DiagnosticStatus | None:
            return next(
                (s for s in self.statuses()[skip:] if predicate(values(s))),
                None,
            )

        if not wait_for(lambda: found() is not None, timeout):
            last = values(self.statuses()[-1]) if self.statuses() else None
            raise AssertionError(f'no such report in {timeout} s; the last: {last}')
        return found()

    def count(self, name: str) -> int:
        """A counter from the newest report."""
        assert wait_for(lambda: bool(self.statuses()), 5.0)
        return int(values(self.statuses()[-1])[name])


# Fast DDS carries a sample across processes in shared memory only if it fits the publisher's
# segment (512 KiB by default); a 640x480 rgb8 frame (900 KiB) goes over UDP fragments instead,
# and best effort (the node's sensor-data QoS) lost every one of 20 here. A camera publishing
# such frames needs a bigger segment, and so does this test's large-frame publisher: a child
# process (the profile is read once per process, at its first participant).
SHM_PROFILE = """<?xml version="1.0" encoding="UTF-8" ?>
<dds xmlns="http://www.eprosima.com">
  <profiles>
    <transport_descriptors>
      <transport_descriptor>
        <transport_id>large_shm</transport_id>
        <type>SHM</type>
        <segment_size>8388608</segment_size>
      </transport_descriptor>
    </transport_descriptors>
    <participant profile_name="large_frames" is_default_profile="true">
      <rtps>
        <userTransports><transport_id>large_shm</transport_id></userTransports>
        <useBuiltinTransports>false</useBuiltinTransports>
      </rtps>
    </participant>
  </profiles>
</dds>
"""

LARGE_FRAME_PUBLISHER = """
import json, sys, time
import rclpy
from sensor_msgs.msg import Image
rclpy.init()
node = rclpy.create_node('large_frame_publisher')
pub = node.create_publisher(Image, 'image', 10)
while pub.get_subscription_count() < 1:
    time.sleep(0.02)
print('ready', flush=True)
for line in sys.stdin:
    spec = json.loads(line)
    msg = Image(height=spec['height'], width=spec['width'], encoding=spec['encoding'],
                step=spec['step'], data=open(spec['data'], 'rb').read())
    msg.header.frame_id = spec['frame_id']
    msg.header.stamp.sec, msg.header.stamp.nanosec = spec['sec'], spec['nanosec']
    pub.publish(msg)
    print('sent', flush=True)
"""


class LargeFramePublisher:
    """Publishes frames on ``image`` from a child process with a large SHM segment."""

    def __init__(self, proc: subprocess.Popen[str], tmp: Path) -> None:
        self.proc, self.tmp = proc, tmp
        assert self._line(30.0) == 'ready'

    def _line(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f'large-frame publisher silent for {timeout} s'
        return self.proc.stdout.readline().strip()

    def publish(self, msg: Image) -> None:
        data = self.tmp / f'frame-{msg.header.stamp.sec}-{msg.header.stamp.nanosec}.bin'
        data.write_bytes(bytes(msg.data))
        spec = {
            'height': msg.height,
            'width': msg.width,
            'encoding': msg.encoding,
            'step': msg.step,
            'data': str(data),
            'frame_id': msg.header.frame_id,
            'sec': msg.header.stamp.sec,
            'nanosec': msg.header.stamp.nanosec,
        }
        self.proc.stdin.write(json.dumps(spec) + '\n')
        self.proc.stdin.flush()
        assert self._line(10.0) == 'sent'


def values(status: DiagnosticStatus) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}


def assert_same(out: PolicyOutput, want: StepResult, step: int) -> None:
    assert out.step == step
    assert (out.action, out.action_name) == (want.action, want.action_name)
    np.testing.assert_allclose(np.array(out.probabilities), want.probabilities, atol=1e-6)


@pytest.fixture(scope='module')
def bundle(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp('policy_node') / 'bundle', dt=DT)


@pytest.fixture(scope='module')
def frames() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(8)]


@pytest.fixture(scope='module')
def moving(bundle, frames) -> dict[str, Any]:
    """A frame whose first action is not 'stop': a zero Twist after it is a real stop."""
    for rgb in frames:
        result = offline(bundle, [fields(rgb)])[0]
        if twist_for(result.action, Policy.from_bundle(bundle).config.actions) != (0.0, 0.0):
            return fields(rgb)
    raise AssertionError('every frame gives stop: the tiny model cannot show a stop')


@pytest.fixture(scope='module')
def rig(bundle, tmp_path_factory):
    env = ros_env()
    log = tmp_path_factory.mktemp('policy_node_log') / 'node.log'
    cmd = ros_args(bundle, backend='litert', **NODE_PARAMS)
    with graph(int(env['ROS_DOMAIN_ID'])) as g, running(cmd, env, log) as proc:
        yield Rig(g, proc, log, env)
        assert proc.poll() is None, f'policy_node died:\n{log.read_text()}'


@pytest.fixture(scope='module')
def large_frames(rig, tmp_path_factory) -> Iterator[LargeFramePublisher]:
    tmp = tmp_path_factory.mktemp('large_frames')
    (tmp / 'fastdds.xml').write_text(SHM_PROFILE)
    env = {**rig.env, 'FASTDDS_DEFAULT_PROFILES_FILE': str(tmp / 'fastdds.xml')}
    proc = subprocess.Popen(
        [sys.executable, '-c', LARGE_FRAME_PUBLISHER],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield LargeFramePublisher(proc, tmp)
    finally:
        proc.stdin.close()
        stop(proc)


def test_outputs_and_commands_match_the_offline_policy_step_for_step(rig, bundle, frames):
    rig.fresh()
    encodings = ['rgb8', 'bgr8', 'rgba8', 'mono8', 'rgb8', 'bgra8', 'rgb8', 'bgr8']
    messages = [fields(rgb, enc) for rgb, enc in zip(frames, encodings, strict=True)]
    messages[4] = fields(cv2.resize(frames[4], (64, 48)))  # another size: resized like offline
    want = offline(bundle, messages)
    table = Policy.from_bundle(bundle).config.actions
    sent_keys = []
    for i, (m, w) in enumerate(zip(messages, want, strict=True)):
        before = len(rig.cmd.snapshot())
        msg, out = rig.step(m)
        sent_keys.append(stamp_key(msg.header.stamp))
        assert stamp_key(out.header.stamp) == sent_keys[-1]
        assert out.header.frame_id == 'camera'
        assert out.enabled
        assert out.inference_ms > 0
        assert_same(out, w, step=i + 1)
        assert rig.cmd.wait_for(lambda got, n=before: len(got) > n, 5.0)
        assert twist_of(rig.cmd.messages()[before]) == pytest.approx(twist_for(w.action, table))
    # the state carried over: the same frames from a zero state one by one would differ
    alone = [offline(bundle, [m])[0] for m in messages[1:]]
    assert any(
        not np.allclose(a.probabilities, w.probabilities, atol=1e-4)
        for a, w in zip(alone, want[1:], strict=True)
    )


def test_reset_service_restarts_the_sequence(rig, bundle, frames):
    rig.fresh()
    messages = [fields(rgb) for rgb in frames[:3]]
    want = offline(bundle, messages)
    for (out, _), w, i in zip(rig.steps(messages), want, range(3), strict=True):
        assert_same(out, w, step=i + 1)
    response, elapsed = rig.reset()
    assert response.success
    assert response.message == 'reset after 3 steps'
    assert elapsed < 1.0
    for (out, _), w, i in zip(rig.steps(messages), want, range(3), strict=True):
        assert_same(out, w, step=i + 1)  # as a fresh policy again
    assert rig.reset()[0].message == 'reset after 3 steps'


def test_disable_stops_commands_and_enable_resumes_from_a_reset_state(rig, bundle, frames):
    rig.fresh()
    messages = [fields(rgb) for rgb in frames[:4]]
    want = offline(bundle, messages)
    for out, cmd in rig.steps(messages[:2]):
        assert out.enabled and cmd is not None
    before = len(rig.cmd.snapshot())
    asked = time.monotonic()
    response, elapsed = rig.enable(False)
    assert response.success and 'disabled' in response.message
    assert elapsed < 1.0
    assert rig.cmd.wait_for(lambda got: len(got) > before, 2.0)
    assert twist_of(rig.cmd.messages()[before]) == (0.0, 0.0)
    # Disabled, it keeps stepping (documented): outputs go on from the same state, no commands.
    for (out, cmd), w, i in zip(rig.steps(messages[2:]), want[2:], (3, 4), strict=True):
        assert not out.enabled and cmd is None
        assert_same(out, w, step=i)
    time.sleep(max(0.0, asked + STOP_AFTER + 0.4 - time.monotonic()))  # no silence stop either
    assert len(rig.cmd.snapshot()) == before + 1, [twist_of(m) for m in rig.cmd.messages()]
    response, _ = rig.enable(True)
    assert response.success
    assert response.message == 'enabled; state reset after 4 steps'
    table = Policy.from_bundle(bundle).config.actions
    for (out, cmd), w, i in zip(rig.steps(messages[:2]), want[:2], (1, 2), strict=True):
        assert out.enabled
        assert_same(out, w, step=i)
        assert twist_of(cmd) == pytest.approx(twist_for(w.action, table))


def test_malformed_frames_are_counted_and_dropped_and_good_ones_unchanged(
    rig, bundle, frames, large_frames
):
    rig.fresh()
    good = [fields(rgb) for rgb in frames[:4]]
    big = fields(cv2.resize(frames[5], (640, 480), interpolation=cv2.INTER_NEAREST), 'bgr8')
    unknown = {**fields(frames[6]), 'encoding': '8UC3'}
    short = {**fields(frames[6]), 'data': fields(frames[6])['data'][:-7]}
    empty = {'height': 0, 'width': 0, 'encoding': 'rgb8', 'step': 0, 'data': b''}
    sequence = [good[0], unknown, good[1], short, big, empty, good[2], good[3]]
    stepped = [good[0], good[1], big, good[2], good[3]]
    want = offline(bundle, stepped)
    malformed = rig.count('malformed')
    outputs = []
    for m in sequence:
        if m is big:  # 640x480: resized like offline (sent from a process that can send it)
            outputs.append(rig.step(m, via=large_frames.publish)[1])
        elif m in stepped:
            outputs.append(rig.step(m)[1])
        else:
            rig.send(m)
            malformed += 1
            # wait until the node took it (depth 1: the next frame would replace it)
            rig.wait_status(lambda v, n=malformed: int(v['malformed']) >= n)
    for i, (out, w) in enumerate(zip(outputs, want, strict=True)):
        assert_same(out, w, step=i + 1)
    assert rig.count('malformed') == malformed
    warned = [s for s in rig.statuses() if s.level == DiagnosticStatus.WARN]
    assert warned and 'malformed frames' in warned[0].message
    assert rig.proc.poll() is None
    assert "'8UC3' image 32x24 (width x height), step 96, 2304 data bytes: unsupported" in (
        rig.text()
    )


def test_late_and_too_fast_frames_are_not_stepped(rig, bundle, frames):
    rig.fresh()
    messages = [fields(rgb) for rgb in frames[:2]]
    want = offline(bundle, messages)
    first, out = rig.step(messages[0])
    assert_same(out, want[0], step=1)
    t0 = first.header.stamp.sec + first.header.stamp.nanosec * 1e-9
    skipped, late = rig.count('skipped'), rig.count('late')
    rig.send(fields(frames[5]), stamp=t0 + 0.2 * DT)  # sooner than 0.8 dt after the last step
    rig.wait_status(lambda v: int(v['skipped']) > skipped)
    rig.send(fields(frames[6]), stamp=time.time() - 5.0)  # older than max_frame_age
    status = rig.wait_status(lambda v: int(v['late']) > late)
    assert status.level == DiagnosticStatus.WARN
    _, out = rig.step(messages[1])
    assert_same(out, want[1], step=2)  # neither of the two was stepped
    assert len(rig.out.snapshot()) == 2


def test_frames_stop_then_a_zero_twist_and_after_a_gap_a_fresh_state(rig, bundle, moving):
    rig.fresh()
    [(_, cmd)] = rig.steps([moving])
    assert twist_of(cmd) != (0.0, 0.0)
    last = rig.cmd.snapshot()[-1].at
    assert rig.cmd.wait_for(lambda got: twist_of(got[-1].msg) == (0.0, 0.0), STOP_AFTER + 2.0)
    stop = rig.cmd.snapshot()[-1]
    assert STOP_AFTER - 0.1 <= stop.at - last <= STOP_AFTER + 0.5
    assert 'published a zero Twist' in rig.text()
    time.sleep(max(0.0, last + RESET_AFTER_GAP + 0.2 - time.monotonic()))
    [(again, _)] = rig.steps([moving])
    assert_same(again, offline(bundle, [moving])[0], step=1)  # reset by the gap, not stepped 2


def test_diagnostics_report_rates_timings_and_identity(rig, bundle, frames):
    rig.fresh()
    rig.steps([fields(rgb) for rgb in frames[:3]])
    status = rig.wait_status(lambda v: v['steps_since_reset'] == '3')
    v = values(status)
    assert status.name == 'policy_node: policy'
    assert (v['backend'], v['bundle'], v['enabled'], v['dt_s']) == (
        'litert',
        str(bundle),
        'true',
        f'{DT:g}',
    )
    assert float(v['inference_ms_p50']) > 0 and float(v['inference_ms_p99']) >= float(
        v['inference_ms_p50']
    )
    assert float(v['frame_age_ms_last']) >= 0
    # Where a frame's time went, stage by stage: the hand-off to the stepping thread, the
    # Twist's own stage (published first) apart from the output's; "callback" holds them all.
    names = ('handoff', 'decode', 'fit', 'normalize', 'model', 'command', 'output')
    stages = {s: float(v[f'{s}_ms_p50']) for s in names}
    assert all(ms > 0 for ms in stages.values()), stages
    assert float(v['callback_ms_p50']) >= max(stages.values())
    counters = ('received', 'stepped', 'skipped', 'superseded', 'errors')
    for key in ('input_rate_hz', 'steps_per_s', *counters):
        assert float(v[key]) >= 0, key
    assert int(v['stepped']) >= 3


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_a_signal_publishes_a_zero_twist_and_exits_cleanly(bundle, moving, tmp_path, sig):
    env = ros_env()
    log = tmp_path / 'node.log'
    # long stop_after: the only zero can come from the shutdown
    cmd = ros_args(bundle, stop_after=30.0, max_frame_age=2.0)
    with graph(int(env['ROS_DOMAIN_ID'])) as g, running(cmd, env, log) as proc:
        r = Rig(g, proc, log, env)
        [(_, moved)] = r.steps([moving])
        assert twist_of(moved) != (0.0, 0.0)
        signalled = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(10) == 0, log.read_text()
        assert r.cmd.wait_for(
            lambda got: twist_of(got[-1].msg) == (0.0, 0.0) and got[-1].at > signalled, 2.0
        ), [twist_of(m) for m in r.cmd.messages()]
    assert f'{sig.name}: publishing a zero Twist and exiting' in log.read_text()


def test_compressed_frames_seeded_sampling_and_starting_disabled(bundle, frames, tmp_path):
    env = ros_env()
    log = tmp_path / 'node.log'
    cmd = ros_args(
        bundle,
        compressed=True,
        max_frame_age=2.0,
        selection='sample',
        seed=5,
        start_enabled=False,
    )
    pngs = [
        {'format': 'png', 'data': cv2.imencode('.png', rgb[..., ::-1])[1].tobytes()}
        for rgb in frames
    ]
    # png is lossless: the node sees the frames' own pixels
    want = offline(
        bundle, [fields(rgb) for rgb in frames], selector=ActionSelector('sample', 0, 5)
    )
    argmax = [int(np.argmax(w.probabilities)) for w in want]
    assert [w.action for w in want] != argmax  # sampling shows: the test can tell
    with graph(int(env['ROS_DOMAIN_ID'])) as g, running(cmd, env, log) as proc:
        r = Rig(g, proc, log, env, compressed=True)
        for i, ((out, cmd), w) in enumerate(zip(r.steps(pngs), want, strict=True)):
            assert_same(out, w, step=i + 1)  # same draws: seeded, not disturbed by the warm-up
            assert not out.enabled and cmd is None
        assert r.cmd.snapshot() == []  # start_enabled false: not one command
    assert '(CompressedImage)' in log.read_text()
    assert 'disabled, waiting for frames' in log.read_text()


def test_keras_backend_runs_and_agrees_with_the_offline_policy(bundle, frames, tmp_path):
    env = ros_env()
    log = tmp_path / 'node.log'
    messages = [fields(rgb) for rgb in frames[:4]]
    want = offline(bundle, messages, backend='keras')
    with (
        graph(int(env['ROS_DOMAIN_ID'])) as g,
        running(ros_args(bundle, backend='keras', max_frame_age=2.0), env, log) as proc,
    ):
        r = Rig(g, proc, log, env)
        for i, ((out, _), w) in enumerate(zip(r.steps(messages), want, strict=True)):
            assert out.step == i + 1 and out.action == w.action
            np.testing.assert_allclose(np.array(out.probabilities), w.probabilities, atol=1e-5)
        assert r.wait_status(lambda v: v['backend'] == 'keras')


def test_precision_int8_runs_the_exported_int8_model(frames, tmp_path):
    """precision:=int8 steps the bundle's step_int8.tflite (made by malpi-ros export from a
    real recording), as the offline int8 policy does, and says so in /diagnostics."""
    from bagfactory import synthetic_drive, write_bag

    from malpi_ros.bagio import reader as bagio
    from malpi_ros.cli import main

    drives = [synthetic_drive(30, start=1000.0 + 20.0 * k, seed=k) for k in range(3)]
    bag = write_bag(tmp_path / 'drive', frames=[f for d in drives for f in d.frames],
                    commands=[c for d in drives for c in d.commands])  # fmt: skip
    source = {'path': str(bag), 'sha256': bagio.sha256_of_bag(bag)}
    int8_bundle = make_tiny_bundle(tmp_path / 'bundle', dt=DT, sources=[source])
    assert main(['export', str(int8_bundle), '--int8', '--quantization', 'full_integer']) == 0
    env = ros_env()
    log = tmp_path / 'node.log'
    messages = [fields(rgb) for rgb in frames[:4]]
    want = Policy.from_bundle(int8_bundle, precision='int8')
    want_fp32 = offline(int8_bundle, messages)
    with (
        graph(int(env['ROS_DOMAIN_ID'])) as g,
        running(ros_args(int8_bundle, precision='int8', max_frame_age=2.0), env, log) as proc,
    ):
        r = Rig(g, proc, log, env)
        outs = [out for out, _ in r.steps(messages)]
        for i, (out, m) in enumerate(zip(outs, messages, strict=True)):
            assert_same(out, want.step(image.decode(SimpleNamespace(**m))), step=i + 1)
        assert r.wait_status(lambda v: v['precision'] == 'int8')
    # Not the fp32 model's outputs: the node really ran the int8 file.
    assert any(
        not np.allclose(out.probabilities, w.probabilities, atol=1e-6)
        for out, w in zip(outs, want_fp32, strict=True)
    )
    assert 'on litert (int8)' in log.read_text()


def _corrupt_tflite(bundle: Path) -> Path:
    (bundle / 'step.tflite').write_bytes(b'\0' * (bundle / 'step.tflite').stat().st_size)
    return bundle / 'step.tflite'


def _corrupt_metadata(bundle: Path) -> Path:
    (bundle / 'metadata.json').write_text('{"format": "malpi_ros.bundle", ')
    return bundle / 'metadata.json'


@pytest.mark.parametrize(
    'spoil',
    [None, _corrupt_tflite, _corrupt_metadata],
    ids=['missing', 'corrupt-model', 'corrupt-metadata'],
)
def test_a_missing_or_corrupt_bundle_exits_non_zero_naming_the_file(bundle, tmp_path, spoil):
    target = tmp_path / 'bundle'
    if spoil is None:
        named = target
    else:
        shutil.copytree(bundle, target)
        named = spoil(target)
    out = subprocess.run(
        ros_args(target), env=ros_env(), capture_output=True, text=True, timeout=30, check=False
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert str(named) in out.stderr
    assert 'Traceback' not in out.stdout + out.stderr


@pytest.mark.parametrize(
    'params, fragment',
    [
        ({'selection': 'greedy'}, "got 'greedy'"),
        ({'epsilon': 1.5}, 'parameter epsilon'),
        ({'stop_after': 0.04}, 'stop_after (0.04 s) must be longer than the bundle dt (0.05 s)'),
    ],
    ids=['selection', 'epsilon-range', 'stop-after-dt'],
)
def test_bad_parameters_exit_non_zero_naming_them(bundle, params, fragment):
    out = subprocess.run(
        ros_args(bundle, **params),
        env=ros_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert fragment in out.stderr


# --- clocks and bounded inputs (issue 11) ----------------------------------------------------


class SimClock:
    """Publishes /clock at 100 Hz from a thread, as a simulator would: sim time = wall time."""

    def __init__(self, g: Graph) -> None:
        self.pub = g.publisher(Clock, '/clock')
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.01):
            now = time.time()
            msg = Clock()
            msg.clock.sec, msg.clock.nanosec = int(now), int((now % 1) * 1e9)
            self.pub.publish(msg)

    def __enter__(self) -> SimClock:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


def test_use_sim_time_ages_frames_on_clock_and_without_clock_steps_nothing(
    bundle, frames, tmp_path
):
    env = ros_env()
    log = tmp_path / 'node.log'
    cmd = ros_args(bundle, use_sim_time=True, max_frame_age=0.5)
    with graph(int(env['ROS_DOMAIN_ID'])) as g, running(cmd, env, log) as proc:
        r = Rig(g, proc, log, env)  # /diagnostics comes: its timer is steady
        # No /clock: an hour-old frame (and a fresh one) must not be stepped as if fresh.
        for stamp in (time.time() - 3600.0, time.time()):
            late = r.count('late')
            r.send(fields(frames[0]), stamp=stamp)
            r.wait_status(lambda v, n=late: int(v['late']) > n)
        assert 'no /clock received yet' in r.text()
        assert r.out.snapshot() == [] and r.cmd.snapshot() == []
        # use_sim_time is chosen at start: refused at run time like every other parameter.
        result = g.set_parameter('/policy_node', 'use_sim_time', False)
        assert not result.successful and 'read-only' in result.reason
        with SimClock(g):  # a simulator's clock: frames are aged on it
            late = r.count('late')
            r.send(fields(frames[1]), stamp=time.time() - 3600.0)
            r.wait_status(lambda v: int(v['late']) > late)
            _, out = r.step(fields(frames[2]))
            assert_same(out, offline(bundle, [fields(frames[2])])[0], step=1)
        assert proc.poll() is None


LOG_TIME = re.compile(r'^\[WARN\] \[(\d+\.\d+)\] \[policy_node\]: (.*)$', re.MULTILINE)


def vm_hwm_mb(pid: int) -> float:
    """Peak resident memory of a process (MB), from /proc."""
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 1024
    raise AssertionError(f'no VmHWM for {pid}')


def test_a_png_bomb_is_dropped_fast_and_small_and_a_slow_decode_is_not_stepped(
    bundle, frames, tmp_path
):
    env = ros_env()
    log = tmp_path / 'node.log'
    # The bomb and the slow decode can take longer than the default reset_after_gap (1 s) on a
    # loaded machine; the last step checks that the state went on, not the gap rule.
    cmd = ros_args(
        bundle, compressed=True, max_frame_age=0.1, diagnostics_period=0.05, reset_after_gap=60.0
    )
    pngs = [
        {'format': 'png', 'data': cv2.imencode('.png', rgb[..., ::-1])[1].tobytes()}
        for rgb in frames[:3]
    ]
    bomb = {'format': 'png', 'data': zero_png(20000, 20000)}  # 390 KB, 400 Mpx
    # 4096 x 4096: at the default limit, so decoded - which takes longer than max_frame_age.
    slow = {'format': 'png', 'data': zero_png(4096, 4096, rows_per_block=128, colour=True)}
    with graph(int(env['ROS_DOMAIN_ID'])) as g, running(cmd, env, log) as proc:
        r = Rig(g, proc, log, env, compressed=True)
        r.steps(pngs[:2])
        outputs, commands = len(r.out.snapshot()), len(r.cmd.snapshot())
        peak = vm_hwm_mb(proc.pid)
        malformed = r.count('malformed')
        for _ in range(3):
            # The first large sample on a connection can arrive after max_frame_age (seen once:
            # 244 ms): then it is dropped as late, undecoded too; send a fresh one.
            late = r.count('late')
            sent = r.send(bomb)
            r.wait_status(
                lambda v, late=late: int(v['malformed']) > malformed or int(v['late']) > late
            )
            if r.count('malformed') > malformed:
                break
        assert r.count('malformed') > malformed
        stamp = sent.header.stamp.sec + sent.header.stamp.nanosec * 1e-9
        [(logged, line)] = [m for m in LOG_TIME.findall(r.text()) if '20000x20000' in m[1]]
        assert float(logged) - stamp < 0.1, line  # dropped within 100 ms of its stamp
        assert 'over the limit of 16777216 (max_frame_pixels)' in line
        grown = vm_hwm_mb(proc.pid) - peak
        print(f'bomb: dropped {float(logged) - stamp:.4f} s after its stamp, peak RSS +{grown} MB')
        assert grown < 50
        late = r.count('late')
        r.send(slow)
        r.wait_status(lambda v: int(v['late']) > late, timeout=15)
        assert 'went stale while decoding' in r.text()
        time.sleep(0.2)
        assert len(r.out.snapshot()) == outputs  # neither was stepped
        # no command for either: only the silence stop's zero may have come since
        assert all(twist_of(m) == (0.0, 0.0) for m in r.cmd.messages()[commands:])
        _, out = r.step(pngs[2])  # and the node goes on
        assert out.step == 3
    assert 'OpenCV' not in log.read_text() and 'libpng' not in log.read_text()


# --- teleop takeover (issue 13) ------------------------------------------------------------


def takeover(r: Rig, applied, source: int, log_line: str | None = None) -> None:
    """Report ``source`` on policy_node's ``applied`` as motor_driver_node would, and wait until
    the node took it in (its takeover count on /diagnostics, or a line in its log)."""
    before = int(values(r.statuses()[-1])['takeovers']) if r.statuses() else 0
    r.diag.clear()
    applied.publish(AppliedCommand(source=source))
    if log_line is None:
        r.wait_status(lambda v: int(v['takeovers']) > before)
    else:
        assert wait_for(lambda: r.text().count(log_line) > 0, 5.0), r.text()


def test_a_takeover_flags_the_outputs_while_stepping_goes_on_with_the_state(rig, bundle, frames):
    rig.fresh()
    applied = rig.g.publisher(AppliedCommand, 'applied')
    assert rig.g.wait_matched(applied)
    messages = [fields(rgb) for rgb in frames[:5]]
    want = offline(bundle, messages)
    ((first, _),) = rig.steps(messages[:1])
    assert not first.overridden
    takeover(rig, applied, AppliedCommand.SOURCE_TELEOP)
    during = rig.steps(messages[1:3])
    # Stepping and publishing go on (the driver ignores the commands); the outputs say so.
    assert [(out.overridden, out.enabled, cmd is not None) for out, cmd in during] == [
        (True, True, True)
    ] * 2
    takeover(rig, applied, AppliedCommand.SOURCE_POLICY, 'takeover ended (control: policy)')
    after = rig.steps(messages[3:])
    assert [out.overridden for out, _ in after] == [False, False]
    # reset_on_handback is off by default: the state carried through the takeover.
    for i, (out, _) in enumerate([(first, None), *during, *after]):
        assert_same(out, want[i], step=i + 1)
    assert 'LSTM state reset' not in rig.text().split('takeover ended')[-1]


def test_reset_on_handback_zeroes_the_state_when_the_takeover_ends(bundle, frames, tmp_path):
    env = ros_env()
    log = tmp_path / 'node.log'
    cmd = ros_args(bundle, reset_on_handback=True, **NODE_PARAMS)
    messages = [fields(rgb) for rgb in frames[:4]]
    want = offline(bundle, messages)
    with graph(int(env['ROS_DOMAIN_ID'])) as g, running(cmd, env, log) as proc:
        r = Rig(g, proc, log, env)
        applied = g.publisher(AppliedCommand, 'applied')
        assert g.wait_matched(applied)
        takeover(r, applied, AppliedCommand.SOURCE_TELEOP)
        outs = [out for out, _ in r.steps(messages[:2])]
        assert [out.overridden for out in outs] == [True, True]
        takeover(r, applied, AppliedCommand.SOURCE_STOP, 'takeover ended (control: stop)')
        outs += [out for out, _ in r.steps(messages[:2])]
        assert proc.poll() is None
    for out, w, step in zip(outs, want[:2] * 2, [1, 2, 1, 2], strict=True):
        assert_same(out, w, step)  # after the hand-back: as a fresh policy again
    assert not outs[2].overridden
    assert 'LSTM state reset before the next step' in log.read_text()
