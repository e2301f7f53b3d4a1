"""Frames normalized once per run (``TrainConfig.normalized_frames_gib``): the batches are the
very numbers of per-batch normalization, a worker's share keeps them, and the budget decides."""

from __future__ import annotations

import numpy as np
import pytest
from bagfactory import synthetic_drive, write_bag
from modelfactory import tiny_config

from malpi_ros.config import ActionTable, DatasetConfig, PreprocessConfig, TrainConfig
from malpi_ros.errors import ConfigError, DatasetError
from malpi_ros.learn.dataset import PLAN_LENGTH, Episode, load_recordings, windows
from malpi_ros.learn.distribute import Placement, worker_sources
from malpi_ros.learn.pipeline import (
    ChunkSource,
    WindowSource,
    normalized_bytes,
    normalized_frames,
)
from malpi_ros.learn.train import normalize_once, prepare

PRE = PreprocessConfig(height=12, width=16, normalization='standardize')


def episodes_of(lengths: list[int], seed: int = 0) -> list[Episode]:
    rng = np.random.default_rng(seed)
    episodes = []
    for i, n in enumerate(lengths):
        frames = rng.integers(0, 255, (n, 12, 16, 3), dtype=np.uint8)
        frames[n // 2] = 77  # a constant frame: the floor of the divisor
        episodes.append(
            Episode(
                bag='synthetic',
                index=i,
                stamps=np.arange(n) * 0.1,
                labels=rng.integers(0, 5, n),
                frames=frames,
                dt=0.1,
                takeover=np.arange(n) % 7 == 0,
            )
        )
    return episodes


def test_window_batches_are_bit_for_bit_those_normalized_per_batch():
    episodes = episodes_of([40, 25, 31])
    cfg = DatasetConfig(state='zero', burn_in=3, seq_len=4, stride=2)
    weights = np.arange(1, 6, dtype=np.float32)
    per_batch = WindowSource(
        episodes, windows(episodes, cfg), cfg.window, 3, PRE, weights, intervention_weight=3.0
    )
    once = WindowSource(
        episodes,
        windows(episodes, cfg),
        cfg.window,
        3,
        PRE,
        weights,
        intervention_weight=3.0,
        inputs=normalized_frames(episodes, PRE),
    )
    rows = np.array([len(once) - 1, 0, 7, 3])
    for a, b in zip(per_batch.batch(rows), once.batch(rows), strict=True):
        np.testing.assert_array_equal(a, b)
    padded = np.array([5, -1, 2])
    for a, b in zip(per_batch.padded_batch(padded), once.padded_batch(padded), strict=True):
        np.testing.assert_array_equal(a, b)
    # A worker's share holds its own episodes' normalized frames, not the first ones'.
    share, plain = once.subset([2, 0]), per_batch.subset([2, 0])
    assert share.inputs is not None and share.inputs[0] is once.inputs[2]
    rows = np.arange(len(share))
    np.testing.assert_array_equal(share.batch(rows)[0], plain.batch(rows)[0])


def test_chunk_batches_with_padding_are_those_normalized_per_batch_in_every_share():
    episodes = episodes_of([30, 5, 17])
    weights = np.ones(5, np.float32)
    per_batch = ChunkSource(episodes, 8, 4, 2, PRE, weights, intervention_weight=2.0)
    once = ChunkSource(
        episodes,
        8,
        4,
        2,
        PRE,
        weights,
        intervention_weight=2.0,
        inputs=normalized_frames(episodes, PRE),
    )
    plan = once.plan()
    assert (plan[..., PLAN_LENGTH] < 8).any()  # some lanes are padded
    for rows in plan:
        for a, b in zip(per_batch.batch(rows), once.batch(rows), strict=True):
            np.testing.assert_array_equal(a, b)
    # The workers' shares (distribute) keep the normalized frames and the takeover factor.
    where = Placement(workers=2)
    for plain, share in zip(
        worker_sources(per_batch, where, 4), worker_sources(once, where, 4), strict=True
    ):
        assert share.intervention_weight == 2.0 and share.inputs is not None
        for rows in share.plan():
            for a, b in zip(plain.batch(rows), share.batch(rows), strict=True):
                np.testing.assert_array_equal(a, b)


def test_inputs_that_do_not_match_the_episodes_are_refused():
    episodes = episodes_of([10, 12])
    inputs = list(normalized_frames(episodes, PRE))
    with pytest.raises(DatasetError, match='float32 arrays of the episodes'):
        ChunkSource(episodes, 4, 1, 0, PRE, np.ones(5, np.float32), inputs=inputs[::-1])
    index = np.array([[0, 0]])
    with pytest.raises(DatasetError, match='float32'):
        WindowSource(
            episodes,
            index,
            4,
            0,
            PRE,
            np.ones(5, np.float32),
            inputs=[x.astype(float) for x in inputs],
        )


def test_the_budget_decides_and_the_note_says_so():
    episodes = episodes_of([40, 25])
    needed = normalized_bytes(episodes)
    assert needed == 4 * 65 * 12 * 16 * 3
    once, note = normalize_once(episodes, TrainConfig())
    assert once and 'normalized once' in note
    over, note = normalize_once(episodes, TrainConfig(normalized_frames_gib=needed / 2**31))
    assert not over and 'per batch' in note and 'normalized_frames_gib' in note
    off, _ = normalize_once(episodes, TrainConfig(normalized_frames_gib=0))
    assert not off
    with pytest.raises(ConfigError, match=r'normalized_frames_gib must be a number >= 0, got -1'):
        TrainConfig(normalized_frames_gib=-1)
    with pytest.raises(ConfigError, match=r"got 'lots'"):
        TrainConfig(normalized_frames_gib='lots')  # type: ignore[arg-type]


@pytest.mark.parametrize('state', ['zero', 'carried'])
def test_prepare_normalizes_once_within_the_budget_and_per_batch_over_it(tmp_path, state):
    bags = []
    for i in range(3):
        drive = synthetic_drive(30, seed=i, start=1000.0 + 100 * i, height=24, width=32)
        bags.append(write_bag(tmp_path / f'd{i}', frames=drive.frames, commands=drive.commands))
    policy = tiny_config(12, 16)
    pre = policy.preprocess
    dataset = DatasetConfig(state=state, burn_in=2, seq_len=5, stride=3)
    rec = load_recordings(bags, pre, dataset, ActionTable())
    prepared = prepare(rec, policy, TrainConfig(val_fraction=0.3))
    assert prepared.train.inputs is not None and prepared.val is not None
    assert prepared.val.inputs is not None
    assert any('normalized once' in note for note in prepared.notes)
    plain = prepare(rec, policy, TrainConfig(val_fraction=0.3, normalized_frames_gib=0))
    assert plain.train.inputs is None and plain.val is not None and plain.val.inputs is None
    assert any('per batch' in note for note in plain.notes)
    rows = (
        np.arange(len(plain.train))
        if isinstance(plain.train, WindowSource)
        else plain.train.plan()[0]
    )
    for a, b in zip(plain.train.batch(rows), prepared.train.batch(rows), strict=True):
        np.testing.assert_array_equal(a, b)
