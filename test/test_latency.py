"""Where the milliseconds go (issue 14): stage stamps, their matching and the latency report.

Pure tests check the arithmetic on known stamps; ``malpi-ros latency`` reads bags written with
rosbags (known stamps) and its error paths name the bag and the topic; the live test runs
policy_node and motor_driver_node (sim backend) as two processes, checks that every stamp is
there and in order, writes what it received into a real bag and checks the report against the
stamps themselves, and reads the same stages on /diagnostics.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bagfactory import APPLIED_TYPE, OUTPUT_TYPE, applied_msg, output_msg, write_bag
from modelfactory import make_tiny_bundle
from support import NODE_DIR, ros_env, running

from malpi_ros import cli
from malpi_ros.bagio.writer import BagWriter, Definitions
from malpi_ros.runtime import latency
from malpi_ros.runtime.latency import Applied, PolicyStamps
from malpi_ros.runtime.node_stats import NodeStats

MS = 1_000_000  # ns
T0 = 1_700_000_000 * 1_000_000_000  # a wall-clock stamp, ns
POLICY, TELEOP = 1, 2


def stamps(i: int, receive=2.0, preprocess=0.5, model=1.0, command=0.25) -> PolicyStamps:
    """Frame i every 100 ms, with its stage times in ms."""
    frame = T0 + i * 100 * MS
    marks = np.cumsum([receive, preprocess, model, command]) * MS
    received, preprocessed, stepped, published = (frame + int(m) for m in marks)
    return PolicyStamps(frame, received, preprocessed, stepped, published)


# -- the arithmetic ---------------------------------------------------------------------------


def test_stage_times_are_contiguous_and_add_up_to_end_to_end():
    s = stamps(0)
    times = s.durations(s.published + 3 * MS)
    assert times == pytest.approx(
        {
            'receive': 2.0,
            'preprocess': 0.5,
            'model': 1.0,
            'command': 0.25,
            'apply': 3.0,
            'end_to_end': 6.75,
        }
    )
    assert sum(times[n] for n in latency.STAGE_NAMES) == pytest.approx(times['end_to_end'])
    # Not applied (yet): no apply and no end to end; not published: no command stage either.
    assert set(s.durations()) == {'receive', 'preprocess', 'model', 'command'}
    quiet = PolicyStamps(s.frame, s.received, s.preprocessed, s.stepped, 0)
    assert set(quiet.durations(s.published)) == {'receive', 'preprocess', 'model'}


def test_stamps_out_of_order_are_refused_saying_what_was_received():
    s = stamps(0)
    with pytest.raises(ValueError, match=r'must not decrease.*preprocessed='):
        PolicyStamps(s.frame, s.received, s.received - 1, s.stepped, s.published).check()
    with pytest.raises(ValueError, match='published before stepped'):
        PolicyStamps(s.frame, s.received, s.preprocessed, s.stepped, s.stepped - 1).check()
    assert s.check() is s


def test_steady_marks_go_on_the_clock_from_one_reading():
    assert latency.on_clock(5_000, 100, (90, 100, 350, 0)) == (4_990, 5_000, 5_250, 0)


def test_each_applied_command_is_matched_to_its_step_once():
    outputs = [stamps(i) for i in range(3)]
    quiet = stamps(3)
    outputs.append(PolicyStamps(quiet.frame, quiet.received, quiet.preprocessed, quiet.stepped, 0))
    # The publish stamp (DDS source timestamp) lies between the step's end and its publish.
    sent = [o.stepped + (o.published - o.stepped) // 2 for o in outputs[:3]]
    applied = [
        Applied(sent[0], sent[0] + 2 * MS),
        Applied(sent[0], sent[0] + 100 * MS),  # the driver's periodic report: counted once
        Applied(sent[2], sent[2] + 4 * MS),
        Applied(0, sent[2] + 5 * MS),  # a stop: no command
        Applied(outputs[1].published + 10 * MS, sent[2]),  # a zero Twist of a silence: no step
    ]
    pairs = latency.match(outputs, applied)
    assert pairs == [(outputs[0], sent[0] + 2 * MS), (outputs[2], sent[2] + 4 * MS)]
    # Within the slack of the clock placement, a stamp just after "published" still matches.
    late = outputs[1].published + latency.MATCH_SLACK_NS
    assert latency.match(outputs, [Applied(late, late + MS)]) == [(outputs[1], late + MS)]


def test_the_report_gives_p50_p99_max_of_known_stage_times_and_their_share():
    n = 101
    outputs = [stamps(i, model=1.0 + i * 0.01) for i in range(n)]
    applied = [Applied(o.published, o.published + (2 + i % 3) * MS) for i, o in enumerate(outputs)]
    result = latency.report(outputs, applied)
    model = np.array([1.0 + i * 0.01 for i in range(n)])
    by_name = {s.name: s for s in result.stages}
    assert by_name['model'].p50 == pytest.approx(np.percentile(model, 50), abs=1e-5)
    assert by_name['model'].p99 == pytest.approx(np.percentile(model, 99), abs=1e-5)
    assert by_name['model'].max == pytest.approx(model.max(), abs=1e-5)
    assert by_name['receive'].p50 == pytest.approx(2.0, abs=1e-5)
    assert by_name['apply'].p50 == pytest.approx(3.0) and by_name['apply'].max == pytest.approx(4)
    e2e = np.array([2.0 + 0.5 + m + 0.25 + (2 + i % 3) for i, m in enumerate(model)])
    assert result.end_to_end.count == n
    assert result.end_to_end.p50 == pytest.approx(np.percentile(e2e, 50), abs=1e-5)
    assert result.end_to_end.max == pytest.approx(e2e.max(), abs=1e-5)
    assert (result.outputs, result.published, result.matched) == (n, n, n)
    assert result.share == pytest.approx(sum(s.p50 for s in result.stages) / result.end_to_end.p50)
    assert 0.95 <= result.share <= 1.05
    assert result.share_of_mean == pytest.approx(1.0)  # contiguous stages: means add up
    text = result.format()
    assert 'end to end: frame stamp -> applied' in text and 'add up to' in text


def test_diagnostics_window_reports_each_latency_stage():
    stats = NodeStats(window=10)
    for i in range(20):  # only the last 10 count
        s = stamps(i, model=float(i))
        stats.stamped(s)
        if i % 2:  # every other one seen applied, 10 ms after its publish
            stats.stamped(s, s.published + 10 * MS)
    report = stats.report(1.0)
    assert float(report.value('latency_model_ms_p50')) == pytest.approx(14.5)
    assert float(report.value('latency_model_ms_max')) == pytest.approx(19.0)
    assert float(report.value('latency_receive_ms_p99')) == pytest.approx(2.0)
    assert float(report.value('latency_apply_ms_max')) == pytest.approx(10.0)
    e2e = [2.0 + 0.5 + i + 0.25 + 10.0 for i in range(1, 20, 2)]
    assert float(report.value('latency_end_to_end_ms_p50')) == pytest.approx(np.median(e2e))
    assert float(report.value('latency_end_to_end_ms_max')) == pytest.approx(max(e2e))
    # Before any frame: nothing measured, said as n/a.
    assert NodeStats().report(1.0).value('latency_apply_ms_p50') == 'n/a'


def test_the_step_of_a_command_is_found_by_its_publish_stamp():
    steps = [stamps(i) for i in range(4)]
    assert latency.owner(steps, steps[2].stepped + 1) is steps[2]
    assert latency.owner(steps, steps[2].stepped) is steps[2]  # the same nanosecond
    assert latency.owner(steps, steps[2].stepped - 1) is None  # before its step ended
    assert latency.owner(steps, steps[3].published + 2 * latency.MATCH_SLACK_NS) is None
    assert latency.owner([], steps[0].stepped) is None


# -- malpi-ros latency on bags ----------------------------------------------------------------


def run_bag(tmp_path: Path, outputs=(), applied=(), name='run', **kwargs) -> Path:
    """A run bag: ~/output and ~/applied messages at their stamps' times."""
    extra = [
        ('/policy_node/output', OUTPUT_TYPE, (o.received or o.frame) * 1e-9, msg)
        for o, msg in outputs
    ]
    extra += [('/motor_driver_node/applied', APPLIED_TYPE, t, msg) for t, msg in applied]
    return write_bag(
        tmp_path / name, image_topic=None, cmd_topic=None, extra_topics=extra, **kwargs
    )


def output_of(s: PolicyStamps, overridden: bool = False):
    stages = (s.received, s.preprocessed, s.stepped, s.published)
    return s, output_msg(s.frame, stages, overridden=overridden)


def applied_of(command: int, applied: int, source: int = POLICY):
    return applied * 1e-9, applied_msg(
        applied * 1e-9, source, 0.3, 0.0, command_ns=command, applied_ns=applied
    )


def latency_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(['latency', *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_latency_verb_reports_a_recorded_run_from_its_stamps(tmp_path, capsys):
    outputs = [stamps(i, model=1.0 + (i % 4)) for i in range(12)]
    taken = stamps(12)  # a takeover drove: left out
    applied = [applied_of(o.published, o.published + 2 * MS) for o in outputs]
    applied += [applied_of(outputs[0].published, outputs[0].published + 90 * MS)]  # repeated
    applied += [applied_of(taken.published, taken.published + 2 * MS, TELEOP)]
    applied += [applied_of(0, outputs[-1].published + 500 * MS)]  # the stop at the end
    bag = run_bag(
        tmp_path,
        [*(output_of(o) for o in outputs), output_of(taken, overridden=True)],
        sorted(applied, key=lambda a: a[0]),
    )
    code, out, err = latency_cli(capsys, str(bag), '--json')
    assert code == 0, err
    doc = json.loads(out)
    assert (doc['outputs'], doc['published'], doc['matched'], doc['overridden']) == (12, 12, 12, 1)
    assert doc['output_topic'] == '/policy_node/output'
    assert doc['applied_topic'] == '/motor_driver_node/applied'
    model = [1.0 + (i % 4) for i in range(12)]
    assert doc['stages']['model']['p50'] == pytest.approx(np.percentile(model, 50), abs=1e-3)
    assert doc['stages']['model']['max'] == pytest.approx(4.0, abs=1e-3)
    assert doc['stages']['apply'] == {'count': 12, 'p50': 2.0, 'p99': 2.0, 'max': 2.0, 'mean': 2.0}
    assert doc['share_of_mean'] == pytest.approx(1.0, abs=1e-3)  # every output applied
    e2e = [2.0 + 0.5 + m + 0.25 + 2.0 for m in model]
    assert doc['stages']['end_to_end']['p50'] == pytest.approx(np.percentile(e2e, 50), abs=1e-3)
    assert doc['stages']['end_to_end']['p99'] == pytest.approx(np.percentile(e2e, 99), abs=1e-3)
    assert doc['share'] == pytest.approx(
        (2.0 + 0.5 + np.percentile(model, 50) + 0.25 + 2.0) / np.percentile(e2e, 50), abs=1e-3
    )
    code, text, _ = latency_cli(capsys, str(bag))
    assert code == 0
    assert 'cmd_vel published -> applied' in text and '12 of 12 commands matched' in text
    assert '1 outputs of teleop takeovers left out' in text


@pytest.mark.parametrize(
    ('content', 'fragment'),
    [
        ('no_applied', "no motor_driver_node's ~/applied topic (malpi_ros/msg/AppliedCommand)"),
        ('no_output', "no policy_node's ~/output topic (malpi_ros/msg/PolicyOutput)"),
        ('unstamped', 'topic /policy_node/output: 3 outputs without stage stamps'),
        ('unmatched', 'topic /motor_driver_node/applied: no applied command matches'),
        ('overridden', 'topic /policy_node/output: every output was overridden by a takeover'),
    ],
)
def test_a_bag_without_what_the_report_needs_is_named_with_its_topic(
    tmp_path, capsys, content, fragment
):
    outputs = [stamps(i) for i in range(3)]
    good_outputs = [output_of(o) for o in outputs]
    good_applied = [applied_of(o.published, o.published + MS) for o in outputs]
    if content == 'no_applied':
        bag = run_bag(tmp_path, good_outputs, ())
    elif content == 'no_output':
        bag = run_bag(tmp_path, (), good_applied)
    elif content == 'unstamped':
        bag = run_bag(tmp_path, [(o, output_msg(o.frame)) for o in outputs], good_applied)
    elif content == 'unmatched':  # e.g. the driver on another clock: stamps an hour apart
        hour = 3600 * 1000 * MS
        shifted = [applied_of(o.published + hour, o.published + hour) for o in outputs]
        bag = run_bag(tmp_path, good_outputs, shifted)
    else:
        bag = run_bag(tmp_path, [output_of(o, overridden=True) for o in outputs], good_applied)
    code, out, err = latency_cli(capsys, str(bag))
    assert code == 1 and out == ''
    assert err.startswith(f'malpi-ros latency: error: bag {bag}')
    assert fragment in err


# -- a live run: policy_node and motor_driver_node in two processes ---------------------------

DT = 0.05
FRAMES = 8


def ns(stamp) -> int:
    return stamp.sec * 1_000_000_000 + stamp.nanosec


def write_run(path: Path, outputs, applied) -> Path:
    """What the test received, as a recorder would store it: CDR bytes at their stamps."""
    from rclpy.serialization import serialize_message

    defs = Definitions()
    for msgtype in (OUTPUT_TYPE, APPLIED_TYPE):
        defs.definition(msgtype)
    records = [
        ('/policy_node/output', OUTPUT_TYPE, ns(m.published) or ns(m.received), m) for m in outputs
    ]
    records += [
        ('/motor_driver_node/applied', APPLIED_TYPE, ns(m.header.stamp), m) for m in applied
    ]
    with BagWriter(path, store=defs.store) as bag:
        for topic, msgtype, _, _ in records:
            bag.add_topic(topic, msgtype)
        for topic, _, t, msg in sorted(records, key=lambda r: r[2]):
            bag.write(topic, t, serialize_message(msg))
    return path


def first_applications(outputs, applied) -> dict[int, tuple[Any, int]]:
    """command stamp -> (its output, when first applied) for every policy command applied.

    Written out here, apart from ``latency.match``: a command's publish stamp lies between its
    step's end and its publish returning (one output, exactly), and the motors got it after.
    """
    from malpi_ros.msg import AppliedCommand

    found: dict[int, tuple[Any, int]] = {}
    for m in applied:
        if m.source != AppliedCommand.SOURCE_POLICY:
            continue
        command, when = ns(m.command_stamp), ns(m.applied_stamp)
        owner = [o for o in outputs if ns(o.stepped) <= command <= ns(o.published) + 500_000]
        assert len(owner) == 1, (command, len(owner))
        assert when >= command
        if command not in found:
            found[command] = (owner[0], when)
    return found


@pytest.mark.ros
def test_a_two_process_run_stamps_every_stage_in_order_and_the_report_agrees(tmp_path, capsys):
    from diagnostic_msgs.msg import DiagnosticArray
    from rosgraph import graph
    from sensor_msgs.msg import Image

    from malpi_ros.msg import AppliedCommand, PolicyOutput
    from malpi_ros.runtime import image

    bundle = make_tiny_bundle(tmp_path / 'bundle', dt=DT)
    env = ros_env()
    policy_log, driver_log = tmp_path / 'policy.log', tmp_path / 'driver.log'
    policy_cmd = [
        str(NODE_DIR / 'policy_node'),
        '--ros-args',
        *('-p', f'bundle:={bundle}', '-p', 'diagnostics_period:=0.25'),
        *('-p', 'max_frame_age:=2.0', '-p', 'stop_after:=10.0'),
        *('-r', 'applied:=/motor_driver_node/applied'),
    ]
    driver_cmd = [
        str(NODE_DIR / 'motor_driver_node'),
        '--ros-args',
        *('-p', 'backend:=sim', '-p', 'cmd_timeout:=2.0'),
    ]
    rng = np.random.default_rng(3)
    with (
        graph(int(env['ROS_DOMAIN_ID'])) as g,
        running(driver_cmd, env, driver_log),
        running(policy_cmd, env, policy_log),
    ):
        outputs = g.collect(PolicyOutput, '/policy_node/output')
        applied = g.collect(AppliedCommand, '/motor_driver_node/applied')
        diag = g.collect(DiagnosticArray, '/diagnostics')
        pub = g.publisher(Image, 'image')
        logs = lambda: policy_log.read_text() + driver_log.read_text()  # noqa: E731
        assert g.wait_matched(pub, timeout=60), logs()
        assert diag.wait_for(bool, 30.0), logs()
        assert g.wait_publishers('/motor_driver_node/applied'), logs()
        assert g.wait_publishers('/cmd_vel'), logs()

        def send() -> None:
            msg = Image(**image.encode_image_fields(rng.integers(0, 256, (24, 32, 3), np.uint8)))
            msg.header.stamp = g.node.get_clock().now().to_msg()
            pub.publish(msg)
            time.sleep(2 * DT)

        def by_policy(got) -> bool:
            return any(r.msg.source == AppliedCommand.SOURCE_POLICY for r in got)

        # Frames until the driver applies the policy's commands (its cmd_vel reader and the
        # policy's writer matched: discovery takes a while on a loaded machine), then the run.
        deadline = time.monotonic() + 30.0
        while not by_policy(applied.snapshot()) and time.monotonic() < deadline:
            send()
        assert by_policy(applied.snapshot()), logs()
        start = time.time_ns()  # the run's frames are stamped after this
        for i in range(FRAMES):
            send()
            assert outputs.wait_for(
                lambda got, n=i: sum(ns(r.msg.header.stamp) > start for r in got) > n, 10.0
            ), logs()
        assert applied.wait_for(
            # Distinct commands (the driver repeats a report): the run's, published after start.
            lambda got: len({c for r in got if (c := ns(r.msg.command_stamp)) > start}) >= FRAMES,
            10.0,
        ), logs()

        # Read before the nodes stop: policy_node's last zero Twist is applied on the way out.
        everything = outputs.messages()  # the warm-up's too: their commands may be applied late
        run_applied = applied.messages()
        applications = first_applications(everything, run_applied)
        # The live /diagnostics saw the same: end to end and apply over every frame applied.
        live_e2e = max(a - ns(o.header.stamp) for o, a in applications.values()) * 1e-6
        live_apply = max(a - ns(o.published) for o, a in applications.values()) * 1e-6

        def live_latency(got) -> bool:
            values = {kv.key: kv.value for r in got[-1:] for s in r.msg.status for kv in s.values}
            e2e, apply = (
                values.get(f'latency_{n}_ms_max', 'n/a') for n in ('end_to_end', 'apply')
            )
            return 'n/a' not in (e2e, apply) and (
                abs(float(e2e) - live_e2e) < 2e-3 and abs(float(apply) - live_apply) < 2e-3
            )

        assert diag.wait_for(live_latency, 10.0), (live_e2e, live_apply, diag.messages()[-1])
        status = {kv.key: kv.value for kv in diag.messages()[-1].status[0].values}

    outs = [o for o in everything if ns(o.header.stamp) > start]
    assert len(outs) == FRAMES
    for out in outs:  # every stamp there, each stage after the one before
        order = [ns(out.header.stamp), ns(out.received), ns(out.preprocessed)]
        order += [ns(out.stepped), ns(out.published)]
        assert all(order) and order == sorted(order), order
        assert order[-1] - order[0] < 2_000_000_000  # one machine, one clock
    # Each command applied was published inside one step's publish (first_applications), and
    # every frame's command was applied, repeats counted once.
    ends = {
        command: applied_ns - ns(o.header.stamp)
        for command, (o, applied_ns) in applications.items()
        if ns(o.header.stamp) > start
    }
    assert len(ends) == FRAMES
    # The live /diagnostics: every stage measured.
    for name in latency.NAMES:
        for q in ('p50', 'p99', 'max'):
            assert float(status[f'latency_{name}_ms_{q}']) >= 0, (name, q, status)
    assert float(status['latency_end_to_end_ms_max']) >= float(status['latency_model_ms_max'])

    # The run recorded, then reported: end to end is what the stamps say.
    run = [m for m in run_applied if ns(m.header.stamp) > start]
    bag = write_run(tmp_path / 'run_bag', outs, run)
    code, out, err = latency_cli(capsys, str(bag), '--json')
    assert code == 0, err
    doc = json.loads(out)
    assert (doc['outputs'], doc['matched']) == (FRAMES, FRAMES)
    e2e_ms = np.array(sorted(ends.values())) * 1e-6
    assert doc['stages']['end_to_end']['max'] == pytest.approx(e2e_ms.max(), abs=1e-3)
    assert doc['stages']['end_to_end']['p50'] == pytest.approx(np.median(e2e_ms), abs=1e-3)
    # Stage by stage too: the receive stage as the messages' own stamps say.
    receive_ms = [(ns(o.received) - ns(o.header.stamp)) * 1e-6 for o in outs]
    assert doc['stages']['receive']['p50'] == pytest.approx(np.median(receive_ms), abs=1e-3)
    assert doc['stages']['receive']['max'] == pytest.approx(max(receive_ms), abs=1e-3)
    assert doc['share'] > 0  # a few frames: medians of parts need not add up to the whole's
