"""Teleop takeover in motor_driver_node, as installed, across processes (issue 13).

A policy stream on ``cmd_vel`` and a person's stream on ``teleop/cmd_vel`` from the test's own
node; the driver (sim backend) in its own process; what it applied read from ``~/applied`` and
``~/wheels``. Timings get the same scheduling slack as the watchdog tests (a loaded 2-core
machine delays any process); the latency figures are printed for the report (``-s``).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from geometry_msgs.msg import Twist
from rosgraph import Graph, Received, graph
from std_msgs.msg import Float32MultiArray
from support import NODE_DIR, ros_env, running, wait_for

from malpi_ros.msg import AppliedCommand
from malpi_ros.runtime.motor import MotorConfig, mix

pytestmark = pytest.mark.ros

NODE = str(NODE_DIR / 'motor_driver_node')
APPLIED = '/motor_driver_node/applied'
WHEELS = '/motor_driver_node/wheels'
CMD_TIMEOUT = 0.5
TELEOP_TIMEOUT = 0.3
PERIOD = 0.05  # 20 Hz: a policy's and a joystick's command rate
SCHEDULING_SLACK = 0.2  # as test_motor_driver_node: a process that gets no CPU is late
CFG = MotorConfig(cmd_timeout=CMD_TIMEOUT)
POLICY_CMD = (0.2, 0.0)
STOP, POLICY, TELEOP = (
    AppliedCommand.SOURCE_STOP,
    AppliedCommand.SOURCE_POLICY,
    AppliedCommand.SOURCE_TELEOP,
)


def twist(linear_x: float, angular_z: float) -> Twist:
    msg = Twist()
    msg.linear.x = linear_x
    msg.angular.z = angular_z
    return msg


def start(g: Graph, log: Path, *extra: str):
    """The driver's command line, and the test's publishers and inboxes, matched."""
    applied = g.collect(AppliedCommand, APPLIED)
    wheels = g.collect(Float32MultiArray, WHEELS)
    policy = g.publisher(Twist, 'cmd_vel')
    teleop = g.publisher(Twist, 'teleop/cmd_vel')
    for pub in (policy, teleop):
        assert g.wait_matched(pub), f'{pub.topic_name} never subscribed:\n{log.read_text()}'
    assert g.wait_publishers(APPLIED), log.read_text()
    return policy, teleop, applied, wheels


def driver_cmd(*extra: str) -> list[str]:
    return [
        NODE,
        '--ros-args',
        '-p',
        'backend:=sim',
        '-p',
        f'cmd_timeout:={CMD_TIMEOUT}',
        '-p',
        f'teleop_timeout:={TELEOP_TIMEOUT}',
        *extra,
    ]


@contextmanager
def policy_stream(pub) -> Iterator[threading.Event]:
    """Publish the policy's command at 20 Hz in a thread, as policy_node would, until set."""
    done = threading.Event()

    def run() -> None:
        while not done.wait(PERIOD):
            pub.publish(twist(*POLICY_CMD))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield done
    finally:
        done.set()
        thread.join(2.0)


def first_after(
    got: list[Received[AppliedCommand]], after: float, source: int, linear: float | None = None
) -> Received[AppliedCommand] | None:
    """The first ~/applied from ``source`` (with ``linear``) that arrived after ``after``.

    Takes the list, not the Inbox: ``Inbox.wait_for`` calls predicates under its lock."""
    for r in got:
        if (r.at > after and r.msg.source == source) and (
            linear is None or abs(r.msg.linear_x - linear) < 1e-9
        ):
            return r
    return None


def test_teleop_takes_over_fast_and_hands_back_to_the_policy_after_teleop_timeout(tmp_path):
    env = ros_env()
    log = tmp_path / 'node.log'
    latencies: list[float] = []
    handbacks: list[float] = []
    windows: list[tuple[float, float]] = []  # (teleop first applied, policy back) per takeover
    with graph(int(env['ROS_DOMAIN_ID'])) as g, running(driver_cmd(), env, log) as proc:
        policy, teleop, applied, wheels = start(g, log)
        with policy_stream(policy):
            assert applied.wait_for(lambda got: any(r.msg.source == POLICY for r in got), 10)
            for _ in range(5):
                # A takeover: six commands at 20 Hz, each a change the driver must report.
                for i in range(6):
                    linear = 0.1 if i % 2 else -0.1
                    sent = time.monotonic()
                    teleop.publish(twist(linear, 0.5))
                    assert applied.wait_for(
                        lambda got, s=sent, v=linear: first_after(got, s, TELEOP, v) is not None,
                        3.0,
                    ), f'teleop ({linear}, 0.5) never applied:\n{log.read_text()}'
                    got = first_after(applied.snapshot(), sent, TELEOP, linear)
                    latencies.append(got.at - sent)
                    if i == 0:
                        took = got.at
                    # During the takeover the policy's commands are not applied.
                    time.sleep(max(0.0, sent + PERIOD - time.monotonic()))
                last_teleop = sent  # then silence: control must come back to the policy
                assert applied.wait_for(
                    lambda got, s=last_teleop: first_after(got, s, POLICY) is not None, 3.0
                ), log.read_text()
                back = first_after(applied.snapshot(), last_teleop, POLICY)
                handbacks.append(back.at - last_teleop)
                windows.append((took, back.at))
                assert back.msg.linear_x == POLICY_CMD[0]
                assert abs(back.msg.left - mix(*POLICY_CMD, CFG)[0]) < 1e-6  # float32
                time.sleep(0.2)
        # While teleop held the wheels, no policy command reached them.
        for took, back in windows:
            during = {r.msg.source for r in applied.snapshot() if took <= r.at < back}
            assert during == {TELEOP}
        teleop_wheels = {tuple(round(x, 5) for x in mix(v, 0.5, CFG)) for v in (0.1, -0.1)}
        seen_wheels = {tuple(round(x, 5) for x in r.msg.data) for r in wheels.snapshot()}
        assert teleop_wheels <= seen_wheels
        assert proc.poll() is None
    text = log.read_text()
    assert 'teleop took over from the policy' in text
    assert 'control back to the policy' in text
    median = statistics.median(latencies)
    print(
        f'takeover latency teleop publish -> ~/applied: median {median * 1e3:.1f} ms, max '
        f'{max(latencies) * 1e3:.1f} ms over {len(latencies)}; hand-back after the last teleop: '
        f'{", ".join(f"{h * 1e3:.0f}" for h in handbacks)} ms (teleop_timeout 300 ms)'
    )
    assert median <= 0.02 + SCHEDULING_SLACK
    for handback in handbacks:
        assert TELEOP_TIMEOUT - 0.01 <= handback <= TELEOP_TIMEOUT + 0.05 + SCHEDULING_SLACK


def test_with_two_inputs_the_watchdog_stops_when_neither_is_fresh_and_applied_says_why(tmp_path):
    env = ros_env()
    log = tmp_path / 'node.log'
    cmd = driver_cmd('-p', 'applied_rate:=20.0')
    with graph(int(env['ROS_DOMAIN_ID'])) as g, running(cmd, env, log) as proc:
        policy, teleop, applied, wheels = start(g, log)
        # No input yet: ~/applied reports the stop at its fixed rate (20 Hz, >= 10 in a second).
        applied.clear()
        time.sleep(1.0)
        idle = applied.snapshot()
        assert len(idle) >= 10 and all(r.msg.source == STOP for r in idle), idle[-3:]
        assert all((r.msg.left, r.msg.right, r.msg.linear_x) == (0, 0, 0) for r in idle)
        # Policy, then a teleop takeover that outlives it: the policy stops publishing first.
        policy.publish(twist(*POLICY_CMD))
        assert applied.wait_for(lambda got: bool(got) and got[-1].msg.source == POLICY, 5)
        # Teleop asks for more than max_linear: ~/applied reports the clamped command.
        start_teleop = time.monotonic()
        while time.monotonic() - start_teleop < CMD_TIMEOUT + 0.3:
            teleop.publish(twist(5.0, 0.0))
            last_sent = time.monotonic()
            time.sleep(PERIOD)
        assert applied.wait_for(lambda got: first_after(got, last_sent, STOP) is not None, 3)
        stop = first_after(applied.snapshot(), last_sent, STOP)
        # Stale teleop with a stale policy is a stop, never a hand-back to an old command.
        between = [r for r in applied.snapshot() if start_teleop < r.at < stop.at]
        assert {r.msg.source for r in between} == {TELEOP}
        assert all(r.msg.linear_x == CFG.max_linear for r in between)
        assert max(r.msg.command_age for r in between) < TELEOP_TIMEOUT + SCHEDULING_SLACK
        assert stop.at - last_sent >= TELEOP_TIMEOUT - 0.01
        assert stop.at - last_sent <= TELEOP_TIMEOUT + 0.05 + SCHEDULING_SLACK
        assert wheels.wait_for(lambda got: tuple(got[-1].msg.data) == (0.0, 0.0), 2)
        assert proc.poll() is None
        assert wait_for(lambda: 'after the last teleop/cmd_vel' in log.read_text(), 2)
