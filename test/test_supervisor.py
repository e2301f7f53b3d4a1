"""The simulated person of the DAgger rounds: when it takes over and when it lets go."""

from __future__ import annotations

import math

import pytest
from modelfactory import make_tiny_bundle

from malpi_ros.errors import ConfigError
from malpi_ros.sim import SimConfig, SimWorld
from malpi_ros.sim.expert import Expert
from malpi_ros.sim.robot import Pose
from malpi_ros.sim.supervisor import (
    Supervisor,
    SupervisorConfig,
    drive_supervised,
    route_error,
)


def supervisor(world: SimWorld) -> Supervisor:
    return Supervisor(Expert(world.track, world.actions, world.config.expert))


def test_gating_takes_over_outside_tolerance_and_lets_go_only_well_inside_after_min_hold():
    sup = supervisor(SimWorld(SimConfig(seed=0), seed=0))
    assert not sup.gate(0.05, 0.3)  # inside both thresholds: the policy drives
    assert sup.gate(0.08, 0.0)  # too far: take over
    assert sup.gate(0.05, 0.1)  # between release and take-over: keep driving
    assert sup.gate(0.01, 0.1)  # back, but held only 3rd frame: min_hold = 3 ends here
    assert not sup.gate(0.01, 0.1)  # well inside after 3 frames: let go
    assert not sup.gate(0.06, 0.5)  # inside the take-over thresholds again: no flicker
    assert sup.gate(0.0, 0.7)  # heading alone is enough
    assert sup.gate(0.0, 0.19)  # back at once, but held for min_hold frames
    assert sup.takeovers == 2
    sup.reset()
    assert not sup.active and sup.takeovers == 0


def test_on_the_route_no_takeover_and_off_it_the_expert_drives_back_then_lets_go():
    world = SimWorld(SimConfig(seed=1, reset_on_off_track=False), seed=1)
    sup = supervisor(world)
    # The expert's own driving stays inside the tolerance: a good policy is never taken over.
    for _ in range(150):
        assert sup.act(world.pose, world.target_branch) is None, route_error(
            world.track, world.pose, world.target_branch
        )
        world.step(world.expert_action())
    # Knock the robot 10 cm sideways: the supervisor drives it back and lets go.
    pose = world.pose
    world.robot.pose = Pose(
        pose.x - 0.10 * math.sin(pose.theta), pose.y + 0.10 * math.cos(pose.theta), pose.theta
    )
    driven = 0
    for _ in range(60):
        action = sup.act(world.pose, world.target_branch)
        if action is None:
            break
        driven += 1
        world.step(action)
    assert sup.takeovers == 1 and not sup.active
    assert 3 <= driven < 60
    distance, heading = route_error(world.track, world.pose, world.target_branch)
    assert distance < 0.03 and heading < 0.2
    assert world.off_track_events == 0


def test_the_wrong_branch_of_the_fork_is_outside_the_tolerance():
    world = SimWorld(SimConfig(seed=2), seed=2)
    track = world.track
    s = track.decide_s
    wrong = 'left' if world.target_branch == 'right' else 'right'
    on_wrong = track.pose_at(s, wrong)
    distance, _ = route_error(track, on_wrong, world.target_branch)
    assert distance > SupervisorConfig().take_over_distance
    assert route_error(track, track.pose_at(s, world.target_branch), world.target_branch)[0] < 0.01


@pytest.mark.parametrize(
    'kwargs, fragment',
    [
        ({'release_distance': 0.1}, 'release_distance (0.1) must be below take_over_distance'),
        ({'release_heading': 0.7}, 'release_heading (0.7) must be below take_over_heading'),
        ({'min_hold': 0}, 'min_hold'),
    ],
)
def test_bad_thresholds_are_refused_saying_what_was_received(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment.replace('(', r'\(').replace(')', r'\)')):
        SupervisorConfig(**kwargs)


def test_a_policy_that_only_turns_left_is_carried_round_a_lap_by_the_supervisor(tmp_path):
    bundle = make_tiny_bundle(tmp_path / 'left', always='left')
    got = drive_supervised(bundle, laps=1, seed=0)
    assert got['laps'] == 1 and got['off_track_events'] == 0, got
    # It strays again after every hand-back: many takeovers, yet the policy drove part of it.
    assert got['takeovers'] >= 5 and 0 < got['takeover_frames'] < got['steps'], got
