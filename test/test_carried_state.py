"""Training with the LSTM state carried across chunks (truncated BPTT): the plan, the batches,
the training model's parity with the sequence model, and the trainer carrying its state."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from modelfactory import TINY_UNITS, tiny_config, tiny_sequence_model

from malpi_ros.config import DatasetConfig
from malpi_ros.errors import ConfigError
from malpi_ros.learn import carried_state
from malpi_ros.learn.carried_state import CarriedStateTrainer, predict_episodes
from malpi_ros.learn.dataset import (
    PLAN_EPISODE,
    PLAN_LENGTH,
    PLAN_SINCE_RESET,
    PLAN_START,
    Episode,
    chunk_plan,
)
from malpi_ros.learn.model import SEQUENCE_INPUT, build_carried_model
from malpi_ros.learn.pipeline import ChunkSource, make_chunk_dataset
from malpi_ros.runtime.image import normalize

LENGTHS = [95, 7, 160, 33]


def lanes_of(plan: np.ndarray) -> list[list[np.ndarray]]:
    return [
        [row for row in plan[:, lane] if row[PLAN_LENGTH] > 0] for lane in range(plan.shape[1])
    ]


def check_plan(plan: np.ndarray, chunk: int) -> None:
    """Every lane continues its episode where it stopped, unless the state restarts from zero."""
    for lane in range(plan.shape[1]):
        previous = None
        for row in plan[:, lane]:
            assert 0 <= row[PLAN_LENGTH] <= chunk
            if row[PLAN_LENGTH] == 0:
                assert row[PLAN_SINCE_RESET] == 0  # padding never carries a state on
                previous = None
                continue
            if row[PLAN_SINCE_RESET] > 0:
                assert previous is not None, 'a carried state needs a chunk before it'
                assert row[PLAN_EPISODE] == previous[PLAN_EPISODE]
                assert row[PLAN_START] == previous[PLAN_START] + previous[PLAN_LENGTH]
                assert row[PLAN_SINCE_RESET] == previous[PLAN_SINCE_RESET] + previous[PLAN_LENGTH]
            previous = row


def covered(plan: np.ndarray) -> dict[int, list[int]]:
    frames: dict[int, list[int]] = {}
    for row in plan.reshape(-1, 4):
        if row[PLAN_LENGTH]:
            start = int(row[PLAN_START])
            frames.setdefault(int(row[PLAN_EPISODE]), []).extend(
                range(start, start + int(row[PLAN_LENGTH]))
            )
    return frames


def test_the_fixed_plan_steps_through_every_frame_once_with_the_state_carried():
    plan = chunk_plan(LENGTHS, chunk=16, lanes=4)
    check_plan(plan, 16)
    frames = covered(plan)
    for episode, n in enumerate(LENGTHS):
        assert sorted(frames[episode]) == list(range(n))
    # Every lane has work: the long episode is cut into pieces, each from a zero state.
    assert all(lanes_of(plan))
    assert plan.shape[0] < -(-sum(LENGTHS) // 16)  # fewer batches than chunks: lanes in parallel


def test_without_pieces_every_episode_runs_whole_from_one_zero_state():
    plan = chunk_plan(LENGTHS, chunk=16, lanes=8, split=False)
    check_plan(plan, 16)
    starts = [row for row in plan.reshape(-1, 4) if row[PLAN_LENGTH] and not row[PLAN_SINCE_RESET]]
    assert sorted(int(r[PLAN_EPISODE]) for r in starts) == list(range(len(LENGTHS)))
    assert all(r[PLAN_START] == 0 for r in starts)


def test_random_plans_move_chunk_boundaries_and_still_step_through_every_frame_once():
    rng = np.random.default_rng(0)
    offsets = set()
    for _ in range(20):
        plan = chunk_plan(LENGTHS, 16, 4, rng)
        check_plan(plan, 16)
        starts = [r for r in plan.reshape(-1, 4) if r[PLAN_LENGTH] and r[PLAN_EPISODE] == 2]
        offsets.add(min(int(r[PLAN_LENGTH]) for r in starts if r[PLAN_START] == 0))
        frames = covered(plan)
        for episode, n in enumerate(LENGTHS):  # no frame dropped, none twice
            assert sorted(frames[episode]) == list(range(n)), episode
        # An episode no longer than a chunk is one chunk from its first frame: nothing to move.
        short = [r for r in plan.reshape(-1, 4) if r[PLAN_LENGTH] and r[PLAN_EPISODE] == 1]
        assert [(r[PLAN_START], r[PLAN_LENGTH], r[PLAN_SINCE_RESET]) for r in short] == [(0, 7, 0)]
    assert len(offsets) > 3  # the first chunk of the long episode has many lengths


def test_a_drive_as_long_as_a_chunk_keeps_its_start_in_every_epoch():
    """The bug this guards: a random offset that dropped the first frames of each episode cut
    the cue out of short expert drives (and their burn-in out of the scored frames)."""
    rng = np.random.default_rng(1)
    lengths = [50] * 12 + [300]
    for _ in range(10):
        plan = chunk_plan(lengths, 50, 4, rng)
        frames = covered(plan)
        assert all(sorted(frames[e]) == list(range(50)) for e in range(12))
        assert sorted(frames[12]) == list(range(300))


def test_validation_lanes_run_each_episode_whole_from_one_zero_state():
    config = tiny_config()
    episodes = episodes_of([95, 7, 160, 33])
    source = ChunkSource(episodes, 16, 4, 0, config.preprocess, np.ones(5, np.float32), False)
    rows = [r for r in source.plan().reshape(-1, 4) if r[PLAN_LENGTH]]
    assert sorted(int(r[PLAN_EPISODE]) for r in rows if r[PLAN_SINCE_RESET] == 0) == [0, 1, 2, 3]
    assert all(r[PLAN_SINCE_RESET] == r[PLAN_START] for r in rows)


def episodes_of(lengths: list[int], shape=(24, 32, 3), seed: int = 0) -> list[Episode]:
    rng = np.random.default_rng(seed)
    return [
        Episode(
            bag='synthetic',
            index=i,
            stamps=np.arange(n) * 0.1,
            labels=rng.integers(0, 5, n),
            frames=rng.integers(0, 255, (n, *shape), dtype=np.uint8),
            dt=0.1,
        )
        for i, n in enumerate(lengths)
    ]


def test_chunk_batches_carry_no_loss_on_burn_in_or_padding_and_flag_resets():
    config = tiny_config()
    episodes = episodes_of([30, 5])
    weights = np.arange(1, 6, dtype=np.float32)
    source = ChunkSource(episodes, 8, 3, 6, config.preprocess, weights)
    plan = source.plan()
    x, reset, y, w = source.batch(plan[1])
    assert x.shape == (3, 8, 24, 32, 3) and x.dtype == np.float32
    for lane, row in enumerate(plan[1]):
        n, since = int(row[PLAN_LENGTH]), int(row[PLAN_SINCE_RESET])
        assert reset[lane] == (since == 0)
        assert np.all(w[lane, n:] == 0) and np.all(x[lane, n:] == 0)
        episode = episodes[int(row[PLAN_EPISODE])]
        start = int(row[PLAN_START])
        np.testing.assert_array_equal(y[lane, :n], episode.labels[start : start + n])
        expected = normalize(episode.frames[start : start + n], config.preprocess)
        np.testing.assert_array_equal(x[lane, :n], expected)
        for t in range(n):
            scored = since + t >= 6
            assert w[lane, t] == (weights[y[lane, t]] if scored else 0.0)
    # The labels that carry loss (for class weights) are exactly those the batches weigh: the
    # first 6 steps of every piece (the 30-frame episode is cut in two) are left out.
    scored = [source.batch(rows) for rows in plan]
    loss_labels = np.concatenate([y[w > 0] for _, _, y, w in scored])
    np.testing.assert_array_equal(np.sort(source.loss_labels()), np.sort(loss_labels))
    assert len(loss_labels) == 30 - 2 * 6


@pytest.fixture(scope='module')
def model():
    return tiny_sequence_model(tiny_config(), seed=3)


def test_the_carried_model_from_zero_state_is_the_sequence_model(model):
    config = tiny_config()
    net = build_carried_model(config.model, model)
    x = np.random.default_rng(1).normal(size=(2, 9, 24, 32, 3)).astype(np.float32)
    zero = np.zeros((2, TINY_UNITS), np.float32)
    out = net({SEQUENCE_INPUT: x, 'h': zero, 'c': zero})
    np.testing.assert_allclose(np.asarray(out['probs']), np.asarray(model(x)), atol=1e-6)
    # The same variables: nothing was copied.
    assert {id(v) for v in net.trainable_variables} == {id(v) for v in model.trainable_variables}


def test_two_chunks_with_the_state_carried_equal_one_sequence_over_both(model):
    config = tiny_config()
    net = build_carried_model(config.model, model)
    x = np.random.default_rng(2).normal(size=(1, 14, 24, 32, 3)).astype(np.float32)
    zero = np.zeros((1, TINY_UNITS), np.float32)
    first = net({SEQUENCE_INPUT: x[:, :5], 'h': zero, 'c': zero})
    h, c = np.asarray(first['h_next']), np.asarray(first['c_next'])
    second = net({SEQUENCE_INPUT: x[:, 5:], 'h': h, 'c': c})
    joined = np.concatenate([np.asarray(first['probs']), np.asarray(second['probs'])], axis=1)
    whole = np.asarray(model(x))
    np.testing.assert_allclose(joined, whole, atol=1e-6)
    # ...and the state matters: restarting the second chunk from zero gives other outputs.
    restarted = np.asarray(net({SEQUENCE_INPUT: x[:, 5:], 'h': zero, 'c': zero})['probs'])
    assert np.max(np.abs(restarted - whole[:, 5:])) > 1e-3


def test_the_trainer_carries_each_lane_state_into_the_next_batch_and_trains_the_model():
    config = tiny_config()
    model = tiny_sequence_model(config, seed=4)
    before = [w.copy() for w in model.get_weights()]
    episodes = episodes_of([40, 23, 17], seed=5)
    source = ChunkSource(episodes, 8, 2, 0, config.preprocess, np.ones(5, np.float32))
    trainer = CarriedStateTrainer(config.model, model, lanes=2)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = trainer.fit(
        make_chunk_dataset(source, shuffle=True, seed=0), epochs=2, verbose=0, shuffle=False
    )
    assert set(history.history) == {'loss', 'accuracy'}
    assert any(np.max(np.abs(a - b)) > 0 for a, b in zip(before, model.get_weights(), strict=True))

    # The state left in the trainer is the one the last batch of the fixed plan ends with, in
    # a lane busy until the end: from the zero state of its piece through every chunk after.
    trainer.evaluate(make_chunk_dataset(source, shuffle=False), verbose=0)
    plan = source.plan()
    lane = next(i for i in range(2) if plan[-1, i, PLAN_LENGTH] > 0)
    rows = plan[:, lane]
    first = max(i for i in range(len(rows)) if rows[i][PLAN_SINCE_RESET] == 0)
    assert len(rows) - first > 1  # more than one chunk: the state really was carried
    # One continuous run over the same inputs (the last chunk's padding included).
    frames = np.concatenate([source.batch(plan[b])[0][lane] for b in range(first, len(rows))])
    zero = np.zeros((1, TINY_UNITS), np.float32)
    run = trainer.net({SEQUENCE_INPUT: frames[None], 'h': zero, 'c': zero})
    np.testing.assert_allclose(
        np.asarray(trainer.state['val', 'h'])[lane], np.asarray(run['h_next'])[0], atol=1e-5
    )

    # Scoring whole episodes chunk by chunk equals the sequence model over each episode.
    actions = predict_episodes(trainer.net, episodes, config.preprocess, TINY_UNITS, chunk=7)
    for episode, got in zip(episodes, actions, strict=True):
        x = normalize(episode.frames, config.preprocess)[None]
        np.testing.assert_array_equal(got, np.argmax(np.asarray(model(x))[0], axis=-1))


@pytest.mark.parametrize('rows', [1, 2, 64])
def test_scoring_episodes_side_by_side_equals_each_alone(model, monkeypatch, rows):
    # Groups of `rows` episodes a call, shorter ones padded at their end: each episode's
    # actions are the sequence model's over that episode alone; an empty one gives none.
    config = tiny_config()
    net = build_carried_model(config.model, model)
    episodes = episodes_of([40, 23, 0, 17, 5], seed=8)
    monkeypatch.setattr(carried_state, 'PREDICT_BYTES', rows * 7 * 4 * 24 * 32 * 3)
    actions = predict_episodes(net, episodes, config.preprocess, TINY_UNITS, chunk=7)
    assert [len(a) for a in actions] == [40, 23, 0, 17, 5]
    for episode, got in zip(episodes, actions, strict=True):
        if len(episode):
            x = normalize(episode.frames, config.preprocess)[None]
            np.testing.assert_array_equal(got, np.argmax(np.asarray(model(x))[0], axis=-1))


def test_a_drive_of_drive_frames_stays_in_one_gradient_with_either_state():
    # What make dagger sizes round 0's cue drives by: a window, or a chunk when the state is
    # carried — an episode of a chunk's length is never cut, whatever the epoch's offset.
    assert DatasetConfig(state='zero', burn_in=110, seq_len=10).drive_frames == 120
    carried = DatasetConfig(state='carried', burn_in=10, seq_len=32)
    assert carried.drive_frames == 32
    for seed in range(5):
        plan = chunk_plan([carried.drive_frames], carried.seq_len, 1, np.random.default_rng(seed))
        assert plan[:, 0, PLAN_LENGTH].tolist() == [carried.drive_frames]
    # One frame more and it is cut in two: the gradient from its end stops at the cut.
    plan = chunk_plan([carried.drive_frames + 1], carried.seq_len, 1, np.random.default_rng(0))
    assert len([n for n in plan[:, 0, PLAN_LENGTH] if n]) == 2


def test_the_training_state_setting_is_checked():
    assert DatasetConfig().state == 'carried'
    with pytest.raises(ConfigError, match=r"state must be one of.*got 'stateful'"):
        DatasetConfig(state='stateful')
