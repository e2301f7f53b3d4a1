"""bagio.replay, the pure part of play and replay-eval: schedules, QoS, restamping, scores."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from bagfactory import image_msg, twist_msg, typestore
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability

from malpi_ros.bagio.replay import (
    REASONS,
    FramePlan,
    FrameResult,
    PlayConfig,
    PlayStats,
    ReplayEvalConfig,
    ReplayReport,
    Seen,
    Throttle,
    choose_qos,
    episode_report,
    frame_results,
    node_arguments,
    parse_param,
    parse_remap,
    plot_replay,
    progress_line,
    restamp_cdr,
    schedule,
)
from malpi_ros.errors import ConfigError
from malpi_ros.runtime.frame_gate import FrameGate

S = 1_000_000_000  # ns per second
START = 1000 * S


# -- PlayConfig and remaps -------------------------------------------------------------------


def test_play_config_normalizes_names_and_maps_topics():
    cfg = PlayConfig(topics=('camera/image_raw', '/cmd_vel', 'cmd_vel'), remaps=(('a', 'b'),))
    assert cfg.topics == ('/camera/image_raw', '/cmd_vel')
    assert cfg.target('/a') == '/b'
    assert cfg.target('/cmd_vel') == '/cmd_vel'


@pytest.mark.parametrize(
    ('kwargs', 'message'),
    [
        ({'rate': 0}, 'rate must be > 0, got 0'),
        ({'rate': -2.0}, 'rate must be > 0, got -2.0'),
        ({'rate': math.nan}, 'rate must be > 0, got nan'),
        ({'start': -1.0}, 'start must be >= 0 seconds, got -1.0'),
        ({'duration': 0.0}, 'duration must be > 0 seconds, got 0.0'),
        ({'wait_for_subscribers': -0.5}, 'wait_for_subscribers must be >= 0 seconds, got -0.5'),
        ({'delay': math.inf}, 'delay must be >= 0 seconds, got inf'),
        ({'topics': ()}, 'at least one topic'),
        ({'topics': ('',)}, 'must not be empty'),
        ({'remaps': (('/a', '/b'), ('a', '/c'))}, 'each topic can be remapped once'),
    ],
)
def test_play_config_refuses_bad_values_and_says_what_it_got(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')):
        PlayConfig(**kwargs)


def test_parse_remap():
    assert parse_remap('/camera/image_raw:=image') == ('/camera/image_raw', '/image')
    for bad in ('cmd_vel', 'a:=', ':=b', 'a:=b:=c'):
        with pytest.raises(ConfigError, match=f'FROM:=TO .* got {bad!r}'):
            parse_remap(bad)


# -- schedule --------------------------------------------------------------------------------


def messages(times_s: list[float], topic: str = '/t') -> list[tuple[str, int, bytes]]:
    return [(topic, START + round(t * S), bytes([i])) for i, t in enumerate(times_s)]


def reader(msgs: list[tuple[str, int, bytes]]):
    calls = []

    def read():
        calls.append(1)
        return iter(msgs)

    return read, calls


def test_schedule_keeps_the_recorded_timing_scaled_by_rate():
    msgs = messages([0.0, 0.1, 0.25, 1.0])
    read, calls = reader(msgs)
    got = list(schedule(read, START, PlayConfig()))
    assert [round(s.due, 9) for s in got] == [0.0, 0.1, 0.25, 1.0]
    assert [s.data for s in got] == [b'\x00', b'\x01', b'\x02', b'\x03']
    assert [s.bag_time for s in got] == pytest.approx([0.0, 0.1, 0.25, 1.0])
    assert calls == [1]
    fast = list(schedule(reader(msgs)[0], START, PlayConfig(rate=2.0)))
    assert [s.due for s in fast] == pytest.approx([0.0, 0.05, 0.125, 0.5])
    slow = list(schedule(reader(msgs)[0], START, PlayConfig(rate=0.5)))
    assert [s.due for s in slow] == pytest.approx([0.0, 0.2, 0.5, 2.0])


def test_schedule_window_starts_at_start_and_ends_after_duration():
    msgs = messages([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    got = list(schedule(reader(msgs)[0], START, PlayConfig(start=0.15, duration=0.2)))
    assert [s.data for s in got] == [b'\x02', b'\x03']
    # Time 0 is the window's start: the first message is due 0.05 s in, not 0.2 s.
    assert [s.due for s in got] == pytest.approx([0.05, 0.15])
    assert [s.bag_time for s in got] == pytest.approx([0.2, 0.3])
    # A window past the last message gives nothing (the player refuses it earlier).
    assert list(schedule(reader(msgs)[0], START, PlayConfig(start=2.0))) == []


def test_schedule_loops_with_the_rhythm_kept_across_the_seam_and_reads_each_pass_afresh():
    msgs = messages([0.0, 0.1, 0.2])
    read, calls = reader(msgs)
    got = list(itertools.islice(schedule(read, START, PlayConfig(loop=True, rate=2.0)), 7))
    assert [s.loop for s in got] == [0, 0, 0, 1, 1, 1, 2]
    assert [s.data[0] for s in got] == [0, 1, 2, 0, 1, 2, 0]
    # One message spacing (0.1 s bag time = 0.05 s at rate 2) between passes.
    assert np.diff([s.due for s in got]) == pytest.approx([0.05] * 6)
    assert len(calls) == 3  # the bag is read again for each pass: nothing held in memory


def test_schedule_loops_a_single_message_once_a_second_and_an_empty_window_not_at_all():
    got = list(
        itertools.islice(schedule(reader(messages([0.3]))[0], START, PlayConfig(loop=True)), 3)
    )
    assert [s.due for s in got] == pytest.approx([0.3, 1.3, 2.3])
    empty = schedule(reader(messages([0.3]))[0], START, PlayConfig(loop=True, start=0.5))
    assert list(empty) == []


def test_schedule_hands_out_bytes_even_from_memoryviews():
    msgs = [('/t', START, memoryview(b'abc'))]
    (item,) = schedule(reader(msgs)[0], START, PlayConfig())  # type: ignore[arg-type]
    assert isinstance(item.data, bytes) and item.data == b'abc'


# -- QoS, throttle, progress -----------------------------------------------------------------


def bag_qos(durability: QosDurability, reliability: QosReliability) -> Qos:
    never = (0, 0)
    return Qos(
        QosHistory.KEEP_LAST, 1, reliability, durability, never, never, QosLiveliness.AUTOMATIC,
        never, False,
    )  # fmt: skip


def test_choose_qos_images_best_effort_others_reliable_latched_only_when_recorded_so():
    image = choose_qos('sensor_msgs/msg/Image')
    assert (image.reliable, image.transient_local, image.depth) == (False, False, 5)
    assert not choose_qos('sensor_msgs/msg/CompressedImage').reliable
    twist = choose_qos('geometry_msgs/msg/Twist')
    assert (twist.reliable, twist.transient_local, twist.depth) == (True, False, 10)
    latched = bag_qos(QosDurability.TRANSIENT_LOCAL, QosReliability.RELIABLE)
    volatile = bag_qos(QosDurability.VOLATILE, QosReliability.RELIABLE)
    assert choose_qos('tf2_msgs/msg/TFMessage', [latched]).transient_local
    assert not choose_qos('tf2_msgs/msg/TFMessage', [latched, volatile]).transient_local
    assert not choose_qos('sensor_msgs/msg/Image', [latched]).transient_local
    assert image.describe == 'best effort, depth 5'
    assert choose_qos('x/msg/Y', [latched]).describe == 'reliable, transient local, depth 10'


def test_throttle_and_progress_line():
    throttle = Throttle(0.5)
    assert [throttle.ready(t) for t in (0.0, 0.2, 0.49, 0.5, 0.6, 1.1)] == [
        True, False, False, True, False, True,
    ]  # fmt: skip
    with pytest.raises(ConfigError, match='got -1'):
        Throttle(-1)
    line = progress_line(12.34, 60.0, 4567, loop=2)
    assert '12.3 / 60.0 s into the bag' in line and '4567 messages' in line and 'loop 3' in line


def test_play_stats_describe_counts_per_topic():
    stats = PlayStats()
    for topic in ('/a', '/b', '/a'):
        stats.count(topic)
    stats.interrupted, stats.wall, stats.loops, stats.unmatched = True, 2.0, 1, ('/c',)
    text = stats.describe()
    assert stats.total == 3
    assert text.startswith('interrupted: 3 messages published in 2 passes in 2.0 s')
    assert '  /a: 2' in text and '  /b: 1' in text and '/c: had no subscriber' in text


# -- restamping ------------------------------------------------------------------------------


@pytest.mark.parametrize('little_endian', [True, False])
@pytest.mark.parametrize('compressed', [False, True])
def test_restamp_sets_only_the_header_stamp(little_endian, compressed):
    store = typestore()
    rgb = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    msgtype = 'sensor_msgs/msg/CompressedImage' if compressed else 'sensor_msgs/msg/Image'
    msg = image_msg(0.0, rgb, compressed=compressed)  # stamp left at zero, as some cameras do
    raw = bytes(store.serialize_cdr(msg, msgtype, little_endian=little_endian))
    stamp = 1_700_000_123 * S + 456_789
    out = restamp_cdr(raw, stamp)
    assert len(out) == len(raw) and out[:4] == raw[:4] and out[12:] == raw[12:]
    back = store.deserialize_cdr(out, msgtype)
    assert (back.header.stamp.sec, back.header.stamp.nanosec) == (1_700_000_123, 456_789)
    assert back.header.frame_id == 'camera'
    assert bytes(back.data) == bytes(msg.data)


def test_restamp_refuses_what_is_not_a_plain_cdr_message():
    with pytest.raises(ConfigError, match='encapsulation 0003'):
        restamp_cdr(b'\x00\x03\x00\x00' + bytes(20), 0)
    with pytest.raises(ConfigError, match='6 bytes'):
        restamp_cdr(b'\x00\x01\x00\x00\x00\x00', 0)
    twist = bytes(typestore().serialize_cdr(twist_msg(0, 1, 2), 'geometry_msgs/msg/Twist'))
    with pytest.raises(ConfigError, match='does not fit'):
        restamp_cdr(twist, 2**40 * S)


# -- replay-eval settings ----------------------------------------------------------------------


def test_node_arguments_lockstep_turns_the_gates_off_realtime_keeps_the_defaults():
    lockstep = node_arguments(ReplayEvalConfig(), '/b', compressed=False, reset_after_gap=1.5)
    assert lockstep[:3] == ['--ros-args', '-r', '__ns:=/replay_eval']
    params = dict(p.split(':=') for p in lockstep[4::2])
    assert params == {
        'bundle': '/b',
        'backend': 'litert',
        'compressed': 'false',
        'selection': 'argmax',
        'respect_dt': 'false',
        'max_frame_age': '0.0',
        'reset_after_gap': '1.5',
    }
    assert all(flag == '-p' for flag in lockstep[3::2])
    cfg = ReplayEvalConfig(
        realtime=True, backend='keras', namespace='test_ns/', node_params=(('num_threads', '1'),)
    )
    realtime = node_arguments(cfg, '/b', compressed=True, reset_after_gap=1.5)
    params = dict(p.split(':=') for p in realtime[4::2])
    assert realtime[2] == '__ns:=/test_ns'
    assert params == {
        'bundle': '/b',
        'backend': 'keras',
        'compressed': 'true',
        'selection': 'argmax',
        'num_threads': '1',
    }
    assert cfg.topic('policy_node/output') == '/test_ns/policy_node/output'


def test_replay_eval_config_and_param_parsing_refuse_bad_values():
    with pytest.raises(ConfigError, match="backend must be one of litert, keras, got 'tpu'"):
        ReplayEvalConfig(backend='tpu')
    with pytest.raises(ConfigError, match='frame_timeout must be > 0 seconds, got 0'):
        ReplayEvalConfig(frame_timeout=0)
    with pytest.raises(ConfigError, match='rate must be > 0'):
        ReplayEvalConfig(rate=-1.0)
    assert parse_param(' num_threads := 1 ') == ('num_threads', '1')
    with pytest.raises(ConfigError, match=r"NAME:=VALUE .* got 'num_threads'"):
        parse_param('num_threads')


# -- scoring ---------------------------------------------------------------------------------


def plan(episode: int, offline: list[int], labels: list[int]) -> list[FramePlan]:
    return [
        FramePlan(episode, i, 10.0 * episode + 0.1 * i, label, action)
        for i, (action, label) in enumerate(zip(offline, labels, strict=True))
    ]


def stepped(actions: list[int], steps: list[int] | None = None) -> list[FrameResult]:
    steps = steps or list(range(1, len(actions) + 1))
    return [
        FrameResult(True, a, s, 0.001 * (i + 1))
        for i, (a, s) in enumerate(zip(actions, steps, strict=True))
    ]


def test_a_node_that_agrees_everywhere_has_no_differences():
    report = episode_report(plan(0, [1, 2, 2, 0], [1, 2, 3, 0]), stepped([1, 2, 2, 0]))
    assert (report.frames, report.played, report.stepped, report.skipped) == (4, 4, 4, 0)
    assert report.diffs == ()
    assert report.offline_agreement == 1.0
    assert report.label_agreement == report.offline_label_agreement == 0.75
    assert report.latencies == pytest.approx((0.001, 0.002, 0.003, 0.004))


def test_every_difference_gets_its_reason():
    offline = [1, 1, 1, 1, 1, 1]
    # frame 1 skipped by the node; frame 2 then differs because its history lacks frame 1.
    results = [
        FrameResult(True, 1, 1, 0.001),
        FrameResult(True, reason='skipped'),
        FrameResult(True, 2, 2, 0.001),
        FrameResult(True, 1, 3, 0.001),
        FrameResult(False),
        FrameResult(False),
    ]
    report = episode_report(plan(0, offline, [1] * 6), results)
    assert [(d.index, d.reason, d.node_action) for d in report.diffs] == [
        (1, 'skipped', None),
        (2, 'after_skip', 2),
    ]
    assert (report.frames, report.played, report.stepped, report.skipped) == (6, 4, 3, 1)
    assert report.not_played == 2
    assert report.offline_agreement == pytest.approx(2 / 3)

    # A step count that is not index + 1: the node's state was reset elsewhere.
    reset = episode_report(plan(1, [0, 0, 0], [0] * 3), stepped([0, 3, 0], steps=[1, 1, 2]))
    assert [(d.index, d.reason) for d in reset.diffs] == [(1, 'reset')]
    # Same history, different action: a runtime mismatch.
    plain = episode_report(plan(2, [0, 0], [0, 0]), stepped([0, 4]))
    assert [(d.index, d.reason, d.offline_action, d.node_action) for d in plain.diffs] == [
        (1, 'differs', 0, 4)
    ]
    missing = episode_report(plan(3, [0], [0]), [FrameResult(True)])
    assert missing.diffs[0].reason == 'missing' and missing.diffs[0].reason in REASONS


def test_episode_report_refuses_inconsistent_input():
    with pytest.raises(ConfigError, match='3 frames but 2 results'):
        episode_report(plan(0, [0, 0, 0], [0] * 3), stepped([0, 0]))
    with pytest.raises(ConfigError, match='at least one frame'):
        episode_report([], [])
    with pytest.raises(ConfigError, match="unknown reason 'gone'"):
        episode_report(plan(0, [0], [0]), [FrameResult(True, reason='gone')])


def make_report(interrupted: bool = False) -> ReplayReport:
    a = episode_report(plan(0, [1, 2, 2, 0], [1, 2, 3, 0]), stepped([1, 2, 2, 0]))
    b = episode_report(
        plan(1, [3, 3, 3], [3, 3, 3]),
        [FrameResult(True, 3, 1, 0.002), FrameResult(True, reason='late'), FrameResult(False)],
    )
    return ReplayReport(
        bundle='bundles/tiny',
        bag='drive',
        image_topic='/camera/image_raw',
        names=('stop', 'forward', 'left', 'right'),
        episodes=(a, b),
        interrupted=interrupted,
        image_messages=9,
        commands_received=5,
        settings={'realtime': False},
    )


def test_replay_report_totals_add_up_and_serialize():
    report = make_report(interrupted=True)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    t = data['totals']
    assert (t['episodes'], t['frames'], t['played'], t['stepped']) == (2, 7, 6, 5)
    assert (t['skipped'], t['not_played'], t['not_evaluated']) == (1, 1, 2)
    assert t['frames'] == t['played'] + t['not_played']
    assert t['played'] == t['stepped'] + t['skipped']
    assert t['offline_agreement'] == 1.0
    assert t['label_agreement'] == pytest.approx(4 / 5)
    assert t['offline_label_agreement'] == pytest.approx(6 / 7)
    assert t['difference_reasons'] == {'late': 1}
    assert t['latency_ms']['p50'] == pytest.approx(2.0)
    assert data['interrupted'] is True
    ep = data['episodes'][1]
    assert ep['node_actions'] == [3, -1, -1]
    assert ep['differences'][0]['offline_action'] == 'right'
    text = report.describe()
    assert 'INTERRUPTED' in text and 'lockstep' in text
    assert 'episode 1 frame 1 (t=10.100 s): evaluate right, node None: late' in text


def test_plot_replay_writes_a_png(tmp_path):
    path = plot_replay(make_report(), tmp_path / 'actions.png')
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert path.stat().st_size > 5000


def test_frame_results_score_outputs_commands_and_the_replayed_gate():
    """replay-eval's scoring without a node: what was sent against what came back."""
    sent = [(START, 10.0), None, (START + S // 10, 10.1), (START + 2 * S, 12.0)]
    outputs = {START: Seen(at=10.05, action=2, step=1, enabled=True)}
    commands = [10.07, 12.5]  # the first answers frame 0; the second comes after the last frame
    results = frame_results(sent, outputs, commands, gate=None)
    assert results[0] == FrameResult(True, 2, 1, pytest.approx(0.07))  # latency to its cmd_vel
    assert results[1] == FrameResult(published=False)
    assert results[2] == FrameResult(published=True, reason='missing')
    # The last frame's output came without an enabled command: latency to the output itself.
    outputs[START + 2 * S] = Seen(at=12.2, action=0, step=2, enabled=False)
    last = frame_results(sent, outputs, commands, gate=None)[3]
    assert last == FrameResult(True, 0, 2, pytest.approx(0.2))
    # Realtime: the node's own gate, replayed, says why a frame has no output.
    gate = FrameGate(0.2, max_frame_age=1.0, reset_after_gap=5.0, respect_dt=True)
    gated = frame_results(sent, outputs, commands, gate)
    assert gated[2].reason == 'skipped'  # 0.1 s after a stepped frame, faster than dt 0.2
