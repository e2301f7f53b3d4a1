"""The takeover rule without ROS: teleop over policy over stop, each fresh within its timeout."""

from __future__ import annotations

import pytest

from malpi_ros.errors import ConfigError
from malpi_ros.runtime.takeover import (
    POLICY,
    SOURCES,
    STOP,
    STOPPED,
    TELEOP,
    Arbiter,
    OverrideWatch,
    Selection,
    Velocity,
)

CMD_TIMEOUT = 0.5
TELEOP_TIMEOUT = 0.3
FORWARD = Velocity(0.3, 0.0)
LEFT = Velocity(0.1, 1.0)
HUMAN = Velocity(-0.2, 0.5)


def arbiter() -> Arbiter:
    return Arbiter(CMD_TIMEOUT, TELEOP_TIMEOUT)


def test_nothing_fed_is_a_stop():
    arb = arbiter()
    assert arb.select(0.0) == STOPPED
    assert arb.last_input() is None
    assert arb.fed_at(POLICY) is None


def test_the_policy_drives_while_fresh_then_the_watchdog_stops():
    arb = arbiter()
    arb.feed(POLICY, 10.0, FORWARD)
    assert arb.select(10.0) == Selection(POLICY, FORWARD)
    assert arb.select(10.0 + CMD_TIMEOUT - 0.01) == Selection(POLICY, FORWARD)
    assert arb.select(10.0 + CMD_TIMEOUT) == STOPPED


def test_teleop_wins_while_fresh_and_hands_back_to_the_newest_policy_command():
    arb = arbiter()
    arb.feed(POLICY, 0.0, FORWARD)
    arb.feed(TELEOP, 0.1, HUMAN)
    assert arb.select(0.1) == Selection(TELEOP, HUMAN)
    # The policy keeps publishing during the takeover: remembered, not applied.
    arb.feed(POLICY, 0.2, LEFT)
    assert arb.select(0.2) == Selection(TELEOP, HUMAN)
    assert arb.select(0.1 + TELEOP_TIMEOUT - 0.01).source == TELEOP
    # Teleop went stale: control returns with the policy's newest command, not the old one.
    assert arb.select(0.1 + TELEOP_TIMEOUT) == Selection(POLICY, LEFT)
    assert arb.last == Selection(POLICY, LEFT)


def test_a_zero_twist_from_teleop_is_a_stop_the_person_asked_for_not_a_hand_back():
    arb = arbiter()
    arb.feed(POLICY, 0.0, FORWARD)
    arb.feed(TELEOP, 0.05, Velocity())
    arb.feed(POLICY, 0.1, FORWARD)
    assert arb.select(0.1) == Selection(TELEOP, Velocity())


@pytest.mark.parametrize('policy_at', [None, 0.0])
def test_with_two_inputs_the_motors_stop_only_when_neither_is_fresh(policy_at):
    arb = arbiter()
    if policy_at is not None:
        arb.feed(POLICY, policy_at, FORWARD)
    arb.feed(TELEOP, 0.5, HUMAN)
    # Teleop holds the wheels past the policy's own timeout ...
    assert arb.select(0.5 + TELEOP_TIMEOUT - 0.01) == Selection(TELEOP, HUMAN)
    # ... and when it goes stale the policy's command is stale too: stop, not a hand-back.
    assert arb.select(0.5 + TELEOP_TIMEOUT) == STOPPED
    assert arb.last_input() == (TELEOP, 0.5)


def test_a_teleop_command_alone_drives_then_stops_after_teleop_timeout():
    arb = arbiter()
    arb.feed(TELEOP, 1.0, HUMAN)
    assert arb.select(1.0).source == TELEOP
    assert arb.select(1.0 + TELEOP_TIMEOUT) == STOPPED
    assert arb.fed_at(TELEOP) == 1.0
    assert arb.fed_at(STOP) is None


def test_source_codes_match_the_message_and_bad_input_is_refused():
    assert SOURCES.index(STOP) == 0 and SOURCES.index(POLICY) == 1 and SOURCES.index(TELEOP) == 2
    assert Selection(TELEOP, HUMAN).code == 2
    with pytest.raises(ValueError, match="got 'stop'"):
        arbiter().feed(STOP, 0.0, FORWARD)
    with pytest.raises(ConfigError, match='teleop_timeout'):
        Arbiter(0.5, 0.0)


def test_the_override_watch_flags_a_takeover_counts_it_and_sees_its_end():
    watch = OverrideWatch(stale_after=1.0)
    assert not watch.overridden(0.0)
    assert not watch.applied(POLICY, 0.0)
    assert not watch.applied(TELEOP, 0.1)
    assert watch.overridden(0.2)
    assert not watch.applied(TELEOP, 0.2)  # the same takeover, reported again
    assert watch.takeovers == 1
    assert watch.applied(POLICY, 0.5)  # the hand-back
    assert not watch.overridden(0.5)
    watch.applied(TELEOP, 1.0)
    assert watch.applied(STOP, 1.3)  # a stop ends a takeover too
    assert watch.takeovers == 2


def test_a_stale_report_flags_nothing():
    watch = OverrideWatch(stale_after=1.0)
    watch.applied(TELEOP, 0.0)
    assert watch.overridden(1.0)
    assert not watch.overridden(1.01)  # the driver went quiet mid-takeover
