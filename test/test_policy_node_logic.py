"""policy_node's pure parts, without ROS: frame gating, the silence stop, stats, the config."""

from __future__ import annotations

import dataclasses
import math

import pytest

from malpi_ros.errors import ConfigError
from malpi_ros.nodes.policy_node_config import PARAMETER_NAMES, PARAMETERS, PolicyNodeConfig
from malpi_ros.runtime.frame_gate import (
    DT_TOLERANCE,
    LATE,
    SKIPPED,
    STEP,
    FrameGate,
    SilenceWatch,
    SimClockWatch,
)
from malpi_ros.runtime.node_stats import ERROR, OK, STAGES, WARN, NodeStats

T0 = 1_700_000_000.0  # a wall-clock stamp, as cameras give


def run(gate: FrameGate, stamps: list[float], latency: float = 0.002) -> list[str]:
    """Feed frames (received ``latency`` after their stamp); step every frame the gate lets in."""
    verdicts = []
    for stamp in stamps:
        decision = gate.decide(stamp, stamp + latency)
        if decision.verdict == STEP:
            gate.stepped(decision.time)
        verdicts.append(decision.verdict + ('+reset' if decision.reset else ''))
    return verdicts


def test_frames_at_the_trained_rate_all_step_even_with_jitter():
    gate = FrameGate(0.1)
    jitter = [0.0, 0.009, -0.009, 0.009, -0.009, 0.0]  # +-9 ms: gaps down to 82 ms
    stamps = [T0 + 0.1 * i + j for i, j in enumerate(jitter)]
    assert run(gate, stamps) == [STEP] * 6


def test_faster_frames_are_skipped_down_to_the_trained_rate():
    gate = FrameGate(0.1)
    stamps = [T0 + i / 30 for i in range(10)]  # 30 Hz camera, 10 Hz policy
    assert run(gate, stamps) == [STEP, SKIPPED, SKIPPED] * 3 + [STEP]
    assert DT_TOLERANCE * 0.1 < 3 / 30  # every third frame is far enough


def test_respect_dt_false_steps_every_newer_frame():
    gate = FrameGate(0.1, respect_dt=False)
    assert run(gate, [T0 + i / 30 for i in range(5)]) == [STEP] * 5


def test_old_frames_are_late_and_zero_max_age_turns_the_check_off():
    gate = FrameGate(0.1, max_frame_age=0.5)
    decision = gate.decide(T0, T0 + 0.6)
    assert (decision.verdict, round(decision.age, 6)) == (LATE, 0.6)
    assert gate.decide(T0, T0 + 0.4).verdict == STEP
    assert FrameGate(0.1, max_frame_age=0).decide(T0, T0 + 100).verdict == STEP


def test_a_frame_not_newer_than_the_last_stepped_one_is_late():
    gate = FrameGate(0.1)
    assert run(gate, [T0, T0, T0 - 0.05, T0 + 0.1]) == [STEP, LATE, LATE, STEP]


def test_a_gap_resets_the_state_and_so_does_a_clock_jumping_back():
    gate = FrameGate(0.1, reset_after_gap=1.0, max_frame_age=0)
    stamps = [T0, T0 + 0.1, T0 + 1.05, T0 + 2.15, T0 + 2.25, T0 - 50.0, T0 - 49.9]
    assert run(gate, stamps) == [STEP, STEP, STEP, 'step+reset', STEP, 'step+reset', STEP]
    assert gate.decide(T0 + 10, T0 + 10).why == 'gap'


def test_reset_every_frame_resets_before_each_step():
    gate = FrameGate(0.1, reset_every_frame=True)
    assert run(gate, [T0, T0 + 0.03, T0 + 0.1]) == ['step+reset', SKIPPED, 'step+reset']


def test_a_zero_stamp_uses_the_receive_time():
    gate = FrameGate(0.1)
    decision = gate.decide(0.0, T0)
    assert (decision.verdict, decision.time, decision.age) == (STEP, T0, 0.0)
    gate.stepped(decision.time)
    assert gate.decide(0.0, T0 + 0.05).verdict == SKIPPED
    assert gate.decide(0.0, T0 + 0.1).verdict == STEP


def test_decide_alone_does_not_advance_the_gate():
    """A frame that passes the gate but fails to decode must not block the next good one."""
    gate = FrameGate(0.1)
    gate.stepped(T0)
    assert gate.decide(T0 + 0.1, T0 + 0.1).verdict == STEP  # (malformed: not stepped)
    assert gate.decide(T0 + 0.12, T0 + 0.12).verdict == STEP


@pytest.mark.parametrize(
    'kwargs, fragment',
    [
        ({'dt': 0}, 'dt must be'),
        ({'dt': 0.1, 'max_frame_age': -1}, 'max_frame_age must be'),
        ({'dt': 0.1, 'reset_after_gap': math.nan}, 'reset_after_gap must be'),
    ],
)
def test_gate_arguments_are_checked(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        FrameGate(**kwargs)


def test_silence_fires_once_per_silence_and_only_after_a_command():
    watch = SilenceWatch(0.5)
    assert not watch.expired(100.0)  # nothing was commanded yet: nothing to stop
    watch.feed(0.0)
    assert [watch.expired(t) for t in (0.2, 0.5, 0.51, 0.6, 5.0)] == [
        False,
        False,
        True,
        False,
        False,
    ]
    watch.feed(6.0)
    watch.disarm()
    assert not watch.expired(7.0)
    with pytest.raises(ConfigError, match='stop_after'):
        SilenceWatch(0)


def test_stats_rates_percentiles_counts_and_levels():
    stats = NodeStats(window=100)
    first = stats.report(0.0)
    assert (first.level, first.message) == (OK, 'no frames since the last report')
    assert first.value('inference_ms_p50') == 'n/a'
    for i in range(20):
        stats.frame(age=0.010)
        if i % 2:
            stats.count('skipped')
        else:
            stats.step(inference_ms=1.0 + i)  # 1, 3, ..., 19
    ok = stats.report(2.0)
    assert (ok.level, ok.message) == (OK, 'ok')
    assert ok.value('input_rate_hz') == '10.0'
    assert ok.value('steps_per_s') == '5.0'
    assert ok.value('inference_ms_p50') == '10.00'
    assert float(ok.value('inference_ms_p99')) == pytest.approx(18.82)
    assert ok.value('frame_age_ms_last') == '10.00'
    assert (ok.value('received'), ok.value('stepped'), ok.value('skipped')) == ('20', '10', '10')

    stats.frame(age=0.9)
    stats.count('late')
    stats.frame(age=0.0)
    stats.count('malformed')
    stats.count('malformed')
    warn = stats.report(3.0, extra=(('enabled', 'true'),))
    assert warn.level == WARN
    assert warn.message == '2 malformed frames, 1 late frames since the last report'
    assert (warn.value('malformed'), warn.value('late'), warn.value('enabled')) == (
        '2',
        '1',
        'true',
    )
    assert warn.value('input_rate_hz') == '2.0'
    assert stats.report(4.0).level == OK  # counts did not grow again: back to OK

    stats.count('errors')
    assert stats.report(5.0).level == ERROR


def test_too_old_rechecks_the_age_after_decoding_and_zero_turns_it_off():
    gate = FrameGate(0.1, max_frame_age=0.5)
    decision = gate.decide(T0, T0 + 0.1)
    assert decision.verdict == STEP
    assert not gate.too_old(decision.time, T0 + 0.5)
    assert gate.too_old(decision.time, T0 + 0.6)  # a 0.5 s decode made it stale
    assert not FrameGate(0.1, max_frame_age=0.0).too_old(T0, T0 + 3600)


def test_sim_clock_watch_refuses_a_clock_at_zero_or_stalled_and_accepts_a_running_one():
    watch = SimClockWatch(0.5)
    assert 'no /clock received yet' in watch.problem(0.0, 100.0)
    assert watch.problem(5.0, 100.0) is None
    assert watch.problem(5.0, 100.4) is None  # no new /clock for 0.4 s: still fine
    assert 'has not moved for 0.60 s (/clock stalled)' in watch.problem(5.0, 100.6)
    assert watch.problem(5.1, 100.7) is None  # it runs again
    unchecked = SimClockWatch(0.0)  # max_frame_age 0: only a clock that never started
    assert unchecked.problem(5.0, 1.0) is None and unchecked.problem(5.0, 1000.0) is None
    assert unchecked.problem(0.0, 1000.0) is not None


def _config(**overrides):
    return PolicyNodeConfig(bundle='/b', **overrides)


def test_config_defaults_match_the_parameter_table_and_robot_yaml():
    import yaml
    from support import REPO

    assert set(PARAMETER_NAMES) == {f.name for f in dataclasses.fields(PolicyNodeConfig)}
    documented = yaml.safe_load((REPO / 'config' / 'nodes' / 'robot.yaml').read_text())
    documented = documented['policy_node']['ros__parameters']
    # robot.yaml lists every parameter but the required bundle, with the node's own defaults.
    assert set(documented) == set(PARAMETER_NAMES) - {'bundle'}
    for name, spec in PARAMETERS.items():
        if name != 'bundle':
            assert documented[name] == spec.default, name
            assert type(documented[name]) is type(spec.default), name
        assert spec.description
        if spec.low is not None:
            assert spec.low <= spec.default <= spec.high, name


@pytest.mark.parametrize(
    'overrides, fragment',
    [
        ({'bundle': ''}, 'parameter bundle is required'),
        ({'backend': 'onnx'}, "backend must be one of litert, keras, got 'onnx'"),
        ({'num_threads': -1}, 'num_threads must be'),
        ({'selection': 'greedy'}, "got 'greedy'"),
        ({'epsilon': 1.5}, 'epsilon must be'),
        ({'seed': -1}, 'seed must be'),
        ({'max_frame_age': -0.1}, 'max_frame_age must be'),
        ({'stop_after': 0.0}, 'stop_after must be'),
        ({'reset_after_gap': math.inf}, 'reset_after_gap must be'),
        ({'diagnostics_period': 0}, 'diagnostics_period must be'),
        ({'max_frame_pixels': 0}, 'max_frame_pixels must be an integer >= 1, got 0'),
        ({'max_frame_pixels': 2**31}, 'max_frame_pixels must be <= 1073741824'),
        ({'respect_dt': 1}, 'respect_dt must be true or false, got 1'),
    ],
)
def test_config_rejects_bad_values_saying_what_it_got(overrides, fragment):
    if 'bundle' in overrides:
        with pytest.raises(ConfigError, match=fragment):
            PolicyNodeConfig(**overrides)
        return
    with pytest.raises(ConfigError, match=fragment):
        _config(**overrides)


def test_config_timeouts_must_exceed_the_bundle_dt():
    _config(stop_after=0.5, reset_after_gap=1.0).check_dt(0.1)
    with pytest.raises(ConfigError, match=r'stop_after \(0.1 s\) must be longer than .*0.1 s'):
        _config(stop_after=0.1).check_dt(0.1)
    with pytest.raises(ConfigError, match='reset_after_gap'):
        _config(stop_after=0.5, reset_after_gap=0.2).check_dt(0.25)


def test_config_selector_is_seeded_and_new_each_time():
    cfg = _config(selection='sample', seed=3)
    probs = [0.2, 0.3, 0.5]
    a, b = cfg.selector(), cfg.selector()
    assert a is not b  # each Policy gets its own random state
    draws = [a.select(probs) for _ in range(30)]
    assert draws == [b.select(probs) for _ in range(30)]
    assert len(set(draws)) > 1  # it does sample


def test_stats_report_the_median_of_each_stage_of_the_frame_path():
    stats = NodeStats(window=10)
    assert stats.report(0.0).value('model_ms_p50') == 'n/a'
    for i in range(5):
        stats.timed(
            handoff=0.05, decode=0.1, fit=0.2, normalize=0.3, model=1.0 + i, command=0.4,
            output=0.5, callback=3.0,
        )  # fmt: skip
    stats.timed(handoff=0.05, decode=0.1, fit=0.2, normalize=0.3, model=3.0, output=0.5,
                callback=3.0)  # fmt: skip
    report = stats.report(1.0)
    # In path order; the Twist's own stage apart from the rest of the publishing that follows
    # it; a step without a command (disabled) leaves the command stage alone.
    assert STAGES == (
        'handoff', 'decode', 'fit', 'normalize', 'model', 'command', 'output', 'callback'
    )  # fmt: skip
    assert [report.value(f'{s}_ms_p50') for s in STAGES] == [
        '0.050', '0.100', '0.200', '0.300', '3.000', '0.400', '0.500', '3.000'
    ]  # fmt: skip
    assert report.value('callback_ms_p99') == '3.000'
    with pytest.raises(ValueError, match=r"unknown stages \['resize'\]"):
        stats.timed(resize=1.0)
