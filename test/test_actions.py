"""Command → label, label → command, and the action selector's modes and checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from malpi_ros.config import Action, ActionTable, from_dict, to_dict
from malpi_ros.errors import ConfigError, DatasetError, MalpiError
from malpi_ros.runtime.actions import ActionSelector, label_for, labels_for, twist_for

TABLE = ActionTable()  # stop, forward, left, right, backward
# A table whose stop action is not first, with wider limits: normalization must matter.
OTHER = ActionTable(
    actions=(
        Action('spin_left', 0.0, 2.0),
        Action('ahead', 1.0, 0.0),
        Action('halt', 0.0, 0.0),
        Action('spin_right', 0.0, -2.0),
    ),
    max_linear=1.0,
    max_angular=2.0,
    dead_zone=0.2,
    stop_action='halt',
)


@pytest.mark.parametrize('table', [TABLE, OTHER], ids=['malpi', 'other'])
def test_each_actions_own_command_maps_to_that_action(table):
    for index, action in enumerate(table.actions):
        assert label_for(action.linear_x, action.angular_z, table) == index
        assert twist_for(index, table) == (action.linear_x, action.angular_z)


def test_commands_inside_the_dead_zone_are_stop():
    # Normalized length < 0.1: 0.02/0.3 and 0.05/1.0 -> hypot(0.067, 0.05) = 0.083.
    assert label_for(0.02, 0.05, TABLE) == TABLE.stop_index
    assert label_for(-0.02, -0.05, TABLE) == TABLE.stop_index
    # Just outside it, a small forward command is still nearer to stop than to forward...
    assert label_for(0.04, 0.0, TABLE) == TABLE.stop_index
    # ... and the stop of OTHER is at index 2, not 0.
    assert label_for(0.1, 0.1, OTHER) == 2


def test_dead_zone_catches_what_would_otherwise_be_another_action():
    table = ActionTable(dead_zone=0.9)
    assert label_for(0.2, 0.0, table) == table.stop_index  # 0.67 normalized: forward without
    assert label_for(0.2, 0.0, ActionTable()) == 1


def test_nearest_action_in_normalized_space():
    assert label_for(0.25, 0.1, TABLE) == 1  # mostly forward
    assert label_for(0.2, 0.8, TABLE) == 2  # forward-left
    assert label_for(0.1, -0.9, TABLE) == 3  # right
    assert label_for(-0.3, 0.05, TABLE) == 4  # backward
    # OTHER normalizes by max_angular=2: 1.5 rad/s is (0, 0.75), nearer spin_left than halt.
    assert label_for(0.0, 1.5, OTHER) == 0


def test_ties_go_to_the_lowest_index():
    # (0.15, 0) normalizes to (0.5, 0): exactly 0.5 from stop (0) and from forward (1).
    assert label_for(0.15, 0.0, TABLE) == 0
    twins = ActionTable(
        actions=(Action('stop', 0, 0), Action('a', 0.3, 0.0), Action('b', 0.3, 0.0)),
    )
    assert label_for(0.3, 0.0, twins) == 1


def test_vectorized_labels_equal_scalar_labels():
    rng = np.random.default_rng(0)
    linear = rng.uniform(-0.4, 0.4, 500)
    angular = rng.uniform(-1.2, 1.2, 500)
    linear[:5] = [0.15, 0.0, 0.3, 0.2, 0.01]  # a tie, zero, and exact action commands
    angular[:5] = [0.0, 0.0, 0.0, -1.0, 0.0]
    labels = labels_for(linear, angular, TABLE)
    assert labels.dtype == np.int64 and labels.shape == (500,)
    assert labels.tolist() == [
        label_for(a, b, TABLE) for a, b in zip(linear, angular, strict=True)
    ]
    assert set(labels.tolist()) == set(range(len(TABLE)))  # every class is reachable
    grid = labels_for(linear.reshape(20, 25), angular.reshape(20, 25), TABLE)
    assert grid.shape == (20, 25) and (grid.ravel() == labels).all()
    assert labels_for(np.array([]), np.array([]), TABLE).shape == (0,)


@pytest.mark.parametrize(
    ('linear', 'angular'), [(math.nan, 0.0), (0.1, math.inf), (-math.inf, math.nan)]
)
def test_non_finite_commands_raise_dataset_error_naming_them(linear, angular):
    with pytest.raises(DatasetError, match='not finite') as err:
        label_for(linear, angular, TABLE)
    assert repr(linear) in str(err.value) and repr(angular) in str(err.value)
    with pytest.raises(DatasetError, match=r'1 of 3 commands .* index \(1,\)'):
        labels_for(np.array([0.1, linear, 0.2]), np.array([0.0, angular, 0.0]), TABLE)


def test_mismatched_command_arrays_raise_dataset_error():
    with pytest.raises(DatasetError, match=r'\(3,\) and \(2,\)'):
        labels_for(np.zeros(3), np.zeros(2), TABLE)


@pytest.mark.parametrize('index', [-1, 5, 99, 1.0, True, '1', None])
def test_twist_for_a_bad_index_raises_config_error_naming_index_and_size(index):
    with pytest.raises(ConfigError) as err:
        twist_for(index, TABLE)
    assert repr(index) in str(err.value) and '5 actions' in str(err.value)


def test_twist_for_accepts_numpy_integers():
    assert twist_for(np.int64(2), TABLE) == (0.2, 1.0)


# --- ActionSelector -----------------------------------------------------------------------

PROBS = np.array([0.1, 0.6, 0.05, 0.2, 0.05])


def test_argmax_is_deterministic_and_ignores_the_seed():
    assert {ActionSelector('argmax', seed=s).select(PROBS) for s in range(5)} == {1}
    assert ActionSelector().select([0.3, 0.3, 0.4, 0.0, 0.0]) == 2
    assert ActionSelector().select([0.4, 0.4, 0.2]) == 0  # ties: lowest index


def test_same_seed_same_sequence_and_reset_restarts_it():
    for mode in ('sample', 'epsilon_greedy'):
        a, b = ActionSelector(mode, 0.5, seed=7), ActionSelector(mode, 0.5, seed=7)
        first = [a.select(PROBS) for _ in range(50)]
        assert first == [b.select(PROBS) for _ in range(50)]
        a.reset()
        assert [a.select(PROBS) for _ in range(50)] == first
        other = ActionSelector(mode, 0.5, seed=8)
        assert [other.select(PROBS) for _ in range(50)] != first


def test_sample_follows_the_probabilities_and_renormalizes():
    selector = ActionSelector('sample', seed=1)
    unnormalized = PROBS * 3.0
    picks = np.array([selector.select(unnormalized) for _ in range(4000)])
    freq = np.bincount(picks, minlength=5) / picks.size
    np.testing.assert_allclose(freq, PROBS, atol=0.03)
    assert (freq != np.eye(5)[1]).any()  # unlike argmax, it explores
    never = ActionSelector('sample', seed=2)
    assert all(never.select([0.5, 0.0, 0.5]) != 1 for _ in range(300))


def test_epsilon_zero_equals_argmax_and_epsilon_one_is_uniform():
    greedy = ActionSelector('epsilon_greedy', epsilon=0.0, seed=3)
    rng = np.random.default_rng(4)
    for _ in range(200):
        p = rng.dirichlet(np.ones(5))
        assert greedy.select(p) == int(np.argmax(p))
    uniform = ActionSelector('epsilon_greedy', epsilon=1.0, seed=3)
    picks = np.array([uniform.select(PROBS) for _ in range(5000)])
    np.testing.assert_allclose(np.bincount(picks, minlength=5) / picks.size, 0.2, atol=0.03)


def test_epsilon_greedy_explores_about_epsilon_of_the_time():
    selector = ActionSelector('epsilon_greedy', epsilon=0.25, seed=5)
    picks = np.array([selector.select(PROBS) for _ in range(4000)])
    # argmax (1) is kept 75% of the time plus a fifth of the random 25%.
    assert abs(np.mean(picks != 1) - 0.25 * 0.8) < 0.03


@pytest.mark.parametrize(
    ('kwargs', 'words'),
    [
        ({'mode': 'greedy'}, "'greedy'"),
        ({'mode': 'epsilon_greedy', 'epsilon': 1.5}, '1.5'),
        ({'epsilon': -0.1}, '-0.1'),
        ({'epsilon': math.nan}, 'nan'),
        ({'epsilon': True}, 'True'),
        ({'seed': -1}, '-1'),
        ({'seed': 1.5}, '1.5'),
        ({'seed': False}, 'False'),
    ],
)
def test_selector_config_errors_say_what_was_given(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        ActionSelector(**kwargs)


@pytest.mark.parametrize(
    'probs', [[], [[0.5, 0.5]], [0.5, math.nan], [0.5, -0.1], [0.0, 0.0], [math.inf, 0.0]]
)
def test_select_rejects_bad_probabilities(probs):
    with pytest.raises(MalpiError, match='probabilities'):
        ActionSelector('sample').select(np.array(probs))


def test_selector_is_frozen_and_round_trips_as_config():
    selector = ActionSelector('epsilon_greedy', 0.1, seed=3)
    with pytest.raises(AttributeError):
        selector.mode = 'argmax'  # type: ignore[misc]
    data = to_dict(selector)
    assert data == {'mode': 'epsilon_greedy', 'epsilon': 0.1, 'seed': 3}
    assert from_dict(ActionSelector, data) == selector
