"""The simulator core: kinematics, track, renderer, expert, lap/fork bookkeeping, learnability.

Pure Python (numpy + cv2), simulated time: the whole file runs in seconds.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from malpi_ros.errors import ConfigError
from malpi_ros.sim import (
    CUE_BRANCH,
    CUE_RGB,
    CUES,
    SIM_ACTIONS,
    Expert,
    Pose,
    Robot,
    RobotConfig,
    SimConfig,
    SimWorld,
    TrackConfig,
    get_track,
    integrate,
    sim_action_table,
    twist_to_wheels,
    wheels_to_twist,
)
from malpi_ros.sim.camera import CameraConfig
from malpi_ros.sim.track import TAPE_RGB

EXACT = RobotConfig(wheel_noise=0.0)


def _cue_pixels(img: np.ndarray, cue: str) -> float:
    """Share of pixels saturated in the cue's colour (red: R >> G, B; blue: B >> R, G)."""
    rgb = img.astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mask = (r > g + 80) & (r > b + 80) if cue == 'red' else (b > r + 80) & (b > g + 60)
    return float(mask.mean())


# --- kinematics ------------------------------------------------------------------------------


def test_straight_line_at_equal_throttles() -> None:
    robot = Robot(EXACT)
    for _ in range(10):
        robot.step_wheels(0.6, 0.6, 0.1)
    # 0.6 * 0.5 m/s for 1 s.
    assert robot.pose.x == pytest.approx(0.3, abs=1e-12)
    assert robot.pose.y == pytest.approx(0.0, abs=1e-12)
    assert robot.pose.theta == pytest.approx(0.0, abs=1e-12)


def test_rotation_in_place_at_opposite_throttles() -> None:
    robot = Robot(EXACT, Pose(1.0, 2.0, 0.0))
    for _ in range(10):
        robot.step_wheels(-0.3, 0.3, 0.1)
    omega = 2 * 0.3 * EXACT.max_wheel_speed / EXACT.track_width  # 2.14 rad/s
    assert robot.pose[:2] == pytest.approx((1.0, 2.0), abs=1e-12)
    assert robot.pose.theta == pytest.approx(omega, abs=1e-9)
    assert robot.last_twist == pytest.approx((0.0, omega))
    for _ in range(10):  # past half a turn the heading wraps to (-pi, pi]
        robot.step_wheels(-0.3, 0.3, 0.1)
    assert robot.pose.theta == pytest.approx(2 * omega - 2 * math.pi, abs=1e-9)


def test_exact_arc_integration_closes_a_circle() -> None:
    pose = Pose(0.5, -0.2, 0.3)
    n = 100
    for _ in range(n):
        pose = integrate(pose, 0.25, 1.0, 2 * math.pi / n)
    assert pose == pytest.approx((0.5, -0.2, 0.3), abs=1e-9)


def test_speed_limits_and_twist_mixing() -> None:
    slow = Robot(RobotConfig(wheel_noise=0.0, max_linear=0.3))
    slow.step_wheels(5.0, 5.0, 1.0)  # throttles clip to 1 (0.5 m/s), body limit 0.3 m/s
    assert slow.pose.x == pytest.approx(0.3)
    # Full throttle in opposite directions would spin at 7.1 rad/s; the body limit is 3.
    assert wheels_to_twist(3.0, -3.0, EXACT) == pytest.approx((0.0, -EXACT.max_angular))
    spin = Robot(EXACT)
    spin.step_wheels(-1.0, 1.0, 0.1)
    assert spin.pose.theta == pytest.approx(0.1 * EXACT.max_angular)
    # In range: mixing and unmixing are inverse.
    for linear, angular in [(0.35, 0.0), (0.25, 1.0), (0.25, -1.0), (-0.2, 0.0), (0.0, 2.0)]:
        left, right = twist_to_wheels(linear, angular, EXACT)
        assert wheels_to_twist(left, right, EXACT) == pytest.approx((linear, angular))
    # Out of range: scaled down as a whole, keeping the curvature (where the robot goes).
    left, right = twist_to_wheels(2.0, 10.0, EXACT)
    assert max(abs(left), abs(right)) == pytest.approx(1.0)
    linear, angular = wheels_to_twist(left, right, EXACT)
    assert angular / linear == pytest.approx(5.0)
    # Every sim action is within what the wheels can do (no silent scaling).
    for action in SIM_ACTIONS:
        left, right = twist_to_wheels(action.linear_x, action.angular_z, RobotConfig())
        assert max(abs(left), abs(right)) <= 1.0, action


def test_kinematics_determinism_and_noise() -> None:
    def drive(rng: np.random.Generator | None, config: RobotConfig | None = None) -> Pose:
        robot = Robot(config or RobotConfig(), rng=rng)
        for i in range(50):
            robot.step_twist(0.3, 0.5 if i % 2 else -0.3, 0.1)
        return robot.pose

    exact = drive(None)
    assert drive(None) == exact
    assert drive(np.random.default_rng(1), EXACT) == exact  # noise 0: the rng is not used
    noisy = drive(np.random.default_rng(5))
    assert drive(np.random.default_rng(5)) == noisy
    assert drive(np.random.default_rng(6)) != noisy
    assert noisy != exact
    assert math.dist(noisy[:2], exact[:2]) < 0.2  # 3 % slip: noise, not chaos


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ('make', 'needle'),
    [
        (lambda: TrackConfig(fork_offset=0.1), '0.1'),
        (lambda: TrackConfig(tape_width=-1.0), '-1.0'),
        (lambda: CameraConfig(tilt_deg=20.0), '20.0'),
        (lambda: RobotConfig(track_width=0), '0'),
        (lambda: SimConfig(dt=0), '0'),
        (lambda: SimConfig(track={'bogus': 1}), 'bogus'),
        (lambda: SimConfig(camera=5), 'int'),
    ],
)
def test_bad_config_says_what_it_got(make, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        make()


def test_sim_config_round_trips_through_dicts() -> None:
    config = SimConfig(track={'cue_gap': 0.5}, camera={'width': 80, 'height': 60}, seed=4)
    assert config.track.cue_gap == 0.5
    assert SimConfig.from_dict(config.to_dict()) == config
    assert sim_action_table().names == ('stop', 'forward', 'left', 'right', 'backward')


# --- track -----------------------------------------------------------------------------------


def test_track_geometry_and_distances() -> None:
    track = get_track(TrackConfig())
    c = track.config
    expected = 2 * c.straight_length + 2 * c.side_length + 2 * math.pi * c.corner_radius
    assert track.length == pytest.approx(expected)
    assert 0 < track.cue_start < track.cue_end < track.fork_start < track.decide_s
    assert track.decide_s < track.fork_end < track.length
    for branch in ('left', 'right'):
        for s in np.linspace(0, track.length, 37, endpoint=False):
            pose = track.pose_at(s, branch)
            near = track.nearest(pose.x, pose.y)
            assert near.distance < 1e-9
            assert (near.s - s + 1) % track.length - 1 == pytest.approx(0.0, abs=1e-6)
    left, right = track.pose_at(track.decide_s, 'left'), track.pose_at(track.decide_s, 'right')
    assert track.nearest(left.x, left.y).lateral == pytest.approx(c.fork_offset)
    assert track.nearest(right.x, right.y).lateral == pytest.approx(-c.fork_offset)
    # Between the branches is off the tape: only a branch is a way through.
    middle = ((left.x + right.x) / 2, (left.y + right.y) / 2)
    assert track.distance(*middle) == pytest.approx(c.fork_offset)
    assert track.distance(*middle) > c.off_track_margin


def test_map_has_tape_cue_and_floor_where_expected() -> None:
    track = get_track(TrackConfig())

    def pixel(cue: str | None, x: float, y: float) -> np.ndarray:
        u, v = np.round(track.to_px([x, y])).astype(int)
        return track.raster(cue)[v, u].astype(int)

    on_tape = track.pose_at(1.0)
    assert np.abs(pixel(None, on_tape.x, on_tape.y) - TAPE_RGB).max() <= 2
    cue = track.pose_at((track.cue_start + track.cue_end) / 2)
    beside = (cue.x, cue.y - 0.25)  # the bottom straight runs along +x: -y is its right
    for name in CUES:
        assert np.abs(pixel(name, *beside) - CUE_RGB[name]).max() <= 2
    floor = pixel(None, *beside)
    assert _cue_pixels(floor.reshape(1, 1, 3), 'red') == 0.0
    assert _cue_pixels(floor.reshape(1, 1, 3), 'blue') == 0.0
    assert not track.raster('red').flags.writeable  # shared by every world: read-only


# --- renderer --------------------------------------------------------------------------------


def test_render_shape_dtype_pose_dependence_and_speed() -> None:
    world = SimWorld(seed=2)
    frame = world.render()
    assert frame.shape == (120, 160, 3)
    assert frame.dtype == np.uint8
    for _ in range(5):
        world.step(SIM_ACTIONS.index(next(a for a in SIM_ACTIONS if a.name == 'left')))
    moved = world.render()
    assert np.abs(moved.astype(int) - frame).mean() > 5
    small = SimWorld(SimConfig(camera={'width': 32, 'height': 24, 'tilt_deg': 40.0}))
    assert small.render().shape == (24, 32, 3)

    n = 300
    start = time.perf_counter()
    for _ in range(n):
        world.render()
    ms = (time.perf_counter() - start) / n * 1e3
    print(f'render: {ms:.2f} ms/frame (120x160, lighting + noise)')


def test_same_seed_same_frames_other_seed_other_frames() -> None:
    def run(seed: int) -> list[np.ndarray]:
        world = SimWorld(seed=seed)
        frames = []
        for _ in range(30):
            frames.append(world.render())
            world.step(world.expert_action())
        return frames

    a, b, c = run(7), run(7), run(8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_cue_in_view_before_the_fork_and_out_of_view_at_it() -> None:
    world = SimWorld(seed=0)
    track, camera = world.track, world.camera
    near_cue = track.pose_at(track.cue_start - 0.1)
    for cue in CUES:
        frame = camera.render(near_cue, cue, world.lighting, np.random.default_rng(0))
        other = 'blue' if cue == 'red' else 'red'
        assert _cue_pixels(frame, cue) > 0.3, cue
        assert _cue_pixels(frame, other) == 0.0, cue
    # From where the expert starts to steer into a branch until deep in it: the carpet is
    # behind the camera, and red and blue laps render the same pixels.
    for branch in ('left', 'right'):
        for s in np.arange(track.fork_start - 0.4, track.decide_s, 0.05):
            for heading in (-0.25, 0.0, 0.25):
                p = track.pose_at(s, branch)
                pose = Pose(p.x, p.y, p.theta + heading)
                red, blue = camera.render_clean(pose, 'red'), camera.render_clean(pose, 'blue')
                assert np.array_equal(red, blue), (branch, s, heading)
                assert _cue_pixels(red, 'red') == 0.0 and _cue_pixels(blue, 'blue') == 0.0
    # The camera really looks ahead: the carpet's corners project into view before the cue.
    corners = np.array([[near_cue.x + 0.4, near_cue.y + 0.2], [near_cue.x + 0.4, near_cue.y]])
    assert camera.project(near_cue, corners)[1].all()
    assert not camera.project(near_cue, [[near_cue.x - 0.3, near_cue.y]])[1].any()


# --- expert and bookkeeping ------------------------------------------------------------------


def test_expert_drives_laps_on_the_tape_and_takes_the_cued_branch() -> None:
    world = SimWorld(seed=0)
    lap_times, worst = [], 0.0
    for _ in range(4000):
        result = world.step(world.expert_action())
        worst = max(worst, world.track.distance(world.pose.x, world.pose.y))
        if result.lap_completed:
            lap_times.append(world.time)
        if world.laps == 4:
            break
    assert world.laps == 4
    assert world.off_track_events == 0
    assert worst < world.config.track.off_track_margin / 2
    decisions = world.fork_decisions
    assert [d.lap for d in decisions] == [0, 1, 2, 3]
    assert all(d.correct and d.branch == CUE_BRANCH[d.cue] for d in decisions), decisions
    assert {d.cue for d in decisions} == set(CUES)
    assert world.distance == pytest.approx(4 * world.track.length, rel=0.05)
    lap = np.diff([0.0, *lap_times])
    print(
        f'track {world.track.length:.2f} m; expert lap {lap.mean():.1f} s '
        f'= {lap.mean() / world.config.dt:.0f} frames at dt={world.config.dt}; '
        f'mean speed {world.distance / world.time:.3f} m/s'
    )


def test_wrong_branch_is_recorded_as_wrong() -> None:
    world = SimWorld(seed=1)
    expert = Expert(world.track, world.actions)
    while world.laps < 2:
        wrong = 'right' if world.target_branch == 'left' else 'left'
        world.step(expert.act(world.pose, wrong))
    assert len(world.fork_decisions) == 2
    assert world.off_track_events == 0
    assert not any(d.correct for d in world.fork_decisions)
    assert all(d.branch != CUE_BRANCH[d.cue] for d in world.fork_decisions)


def test_off_track_event_counted_once_and_robot_put_back() -> None:
    forward = sim_action_table().names.index('forward')
    # Straight on from the start line leaves the tape at the first corner.
    world = SimWorld(SimConfig(start_jitter=0.0, start_heading_jitter=0.0))
    events = [world.step(forward) for _ in range(100)]
    respawns = [r for r in events if r.respawned]
    assert world.off_track_events == len(respawns) >= 1
    assert world.off_track_at_fork == 0  # the first corner, not the fork
    assert all(r.off_track_event for r in respawns)
    assert world.track.distance(world.pose.x, world.pose.y) < 0.2

    stay = SimWorld(SimConfig(reset_on_off_track=False, start_jitter=0.0))
    results = [stay.step(forward) for _ in range(100)]
    assert stay.off_track_events == 1  # one excursion, however many steps it lasts
    assert results[-1].off_track and stay.off_track
    assert stay.track.distance(stay.pose.x, stay.pose.y) > 0.5


def test_leaving_the_tape_between_the_branches_counts_at_the_fork() -> None:
    world = SimWorld(SimConfig(reset_on_off_track=False, start_jitter=0.0))
    forward = world.actions.names.index('forward')
    for _ in range(200):  # the expert to just before the fork, then straight on: mid-fork
        if world.lap_s >= world.track.fork_start - 0.05:
            break
        world.step(world.expert_action())
    assert world.off_track_events == 0
    for _ in range(30):
        world.step(forward)
    assert world.off_track_events == world.off_track_at_fork == 1
    assert world.summary()['off_track_at_fork'] == 1
    assert world.fork_decisions[-1].branch == 'none'


def test_backing_over_the_start_line_does_not_count_a_lap() -> None:
    world = SimWorld(seed=3)
    names = world.actions.names
    for _ in range(20):
        world.step(names.index('backward'))
    assert world.progress < 0
    for _ in range(30):
        world.step(world.expert_action())
    assert world.progress > 0
    assert world.laps == 0
    with pytest.raises(ValueError, match='7'):
        world.step(7)
    with pytest.raises(ValueError, match='bad'):
        world.step('bad')  # type: ignore[arg-type]


# --- learnability: the cue is plain to see, and the fork shows nothing of it ---------------


def test_cue_frames_differ_by_colour_and_fork_frames_do_not() -> None:
    world = SimWorld(seed=5)
    track = world.track
    feature: dict[tuple[str, str], list[float]] = {}
    fork_poses = []
    while world.laps < 8:
        s = world.lap_s
        where = None
        if track.cue_start - 0.6 < s < track.cue_end - 0.3:
            where = 'cue'
        elif track.fork_start - 0.3 < s < track.fork_start + 0.3:
            where = 'fork'
            fork_poses.append(world.pose)
        if where:
            frame = world.render().astype(float)
            # The simplest colour feature: mean red minus mean blue over the frame.
            value = frame[..., 0].mean() - frame[..., 2].mean()
            feature.setdefault((where, world.cue), []).append(value)
        world.step(world.expert_action())

    cue_red, cue_blue = np.array(feature['cue', 'red']), np.array(feature['cue', 'blue'])
    fork_red, fork_blue = np.array(feature['fork', 'red']), np.array(feature['fork', 'blue'])
    assert cue_red.min() > cue_blue.max()  # one threshold tells the cue from any cue frame
    cue_gap = cue_red.mean() - cue_blue.mean()
    fork_gap = abs(fork_red.mean() - fork_blue.mean())
    print(f'mean(R)-mean(B): cue frames red-blue {cue_gap:.1f}, fork frames {fork_gap:.2f}')
    assert cue_gap > 40
    assert fork_gap < 0.1 * cue_gap  # what differs at the fork is lighting, not the cue
    # Paired, without lighting or noise: the fork frames are the same pixels for either cue.
    for pose in fork_poses[::5]:
        red = world.camera.render_clean(pose, 'red')
        assert np.array_equal(red, world.camera.render_clean(pose, 'blue'))


def frames_from_cue_to_fork(world: SimWorld, laps: int) -> list[int]:
    """Expert steps from the robot passing the cue carpet's end to reaching the fork, per lap
    (the carpet leaves the camera's view before that: a lower bound on the memory needed)."""
    track, counts, since, before = world.track, [], None, world.lap_s
    while len(counts) < laps:
        world.step(world.expert_action())
        now = world.lap_s
        if before < track.cue_end <= now:
            since = 0
        if since is not None:
            since += 1
            if before < track.fork_start <= now:
                counts.append(since)
                since = None
        before = now
    return counts


def test_the_long_horizon_puts_the_cue_over_50_frames_before_an_identical_fork() -> None:
    short = SimWorld(SimConfig(track=TrackConfig.for_horizon('short')), seed=3)
    assert short.config.track == TrackConfig()  # the demo's track is the short horizon
    assert max(frames_from_cue_to_fork(short, 3)) < 20
    world = SimWorld(SimConfig(track=TrackConfig.for_horizon('long')), seed=3)
    counts = frames_from_cue_to_fork(world, 4)
    print(f'long horizon: {counts} frames from the cue to the fork')
    assert min(counts) >= 50
    assert world.off_track_events == 0
    pose = world.track.pose_at(world.track.fork_start + 0.1)
    assert np.array_equal(world.camera.render_clean(pose, 'red'),
                          world.camera.render_clean(pose, 'blue'))  # fmt: skip
    with pytest.raises(ConfigError, match="horizon must be one of short, long, got 'medium'"):
        TrackConfig.for_horizon('medium')


def test_plot_writes_a_png_of_the_run(tmp_path) -> None:
    import cv2

    from malpi_ros.sim.plot import plot_trajectories

    world = SimWorld(seed=0)
    xy = []
    for _ in range(200):
        world.step(world.expert_action())
        xy.append(world.pose[:2])
    path = plot_trajectories(
        world.track,
        {'expert': np.array(xy)},
        tmp_path / 'run.png',
        title='expert',
        marks={'start': np.array([xy[0]])},
    )
    img = cv2.imread(str(path))
    assert img is not None and img.shape[0] > 200 and img.shape[1] > 500
    blank = cv2.imread(
        str(plot_trajectories(world.track, {}, tmp_path / 'map.png', title='expert'))
    )
    assert blank.shape == img.shape
    # The trajectory is drawn in matplotlib's first line colour (tab:blue, BGR 180 119 31),
    # which the map alone does not contain.
    blue = np.all(np.abs(img.astype(int) - (180, 119, 31)) <= 10, axis=2)
    assert (
        blue.sum() > 200
        and not np.all(np.abs(blank.astype(int) - (180, 119, 31)) <= 10, axis=2).any()
    )
