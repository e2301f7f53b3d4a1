"""Backpropagation through a window's last frames only (``DatasetConfig.bptt``): the setting's
checks, the same outputs as the sequence model, and no gradient reaching the forward-only
frames (where the whole window's backward pass reaches them)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from modelfactory import tiny_config, tiny_sequence_model

from malpi_ros.config import DatasetConfig
from malpi_ros.errors import ConfigError
from malpi_ros.learn.distribute import WindowTrainer

FRAMES, CUT = 12, 7


def test_bptt_is_checked_against_the_window_and_the_state():
    cfg = DatasetConfig(state='zero', burn_in=10, seq_len=4, bptt=6)
    assert (cfg.window, cfg.forward_only) == (14, 8)
    assert DatasetConfig(state='zero', burn_in=10, seq_len=4).forward_only == 0
    assert DatasetConfig(state='zero', burn_in=10, seq_len=4, bptt=14).forward_only == 0
    # More than the window: the whole window (a recipe's bptt stays valid for shorter windows,
    # e.g. the simulator's config with --burn-in 10).
    assert DatasetConfig(state='zero', burn_in=10, seq_len=4, bptt=40).forward_only == 0
    with pytest.raises(ConfigError, match=r'at least seq_len \(4\).*got 3'):
        DatasetConfig(state='zero', burn_in=10, seq_len=4, bptt=3)
    with pytest.raises(ConfigError, match=r"with state 'carried'.*got bptt=6"):
        DatasetConfig(state='carried', seq_len=4, bptt=6)
    with pytest.raises(ConfigError, match='bptt'):
        DatasetConfig(state='zero', bptt=-1)


def _grads(trainer_or_model, x):
    """d(loss on the last 3 frames) / d(frames), per frame, in training mode."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        probs = trainer_or_model(x, training=True)
        loss = -tf.reduce_sum(tf.math.log(probs[:, -3:, 1]))
    grad = tape.gradient(loss, x)
    return np.abs(np.asarray(grad)).sum(axis=(0, 2, 3, 4)), np.asarray(probs)


def test_the_forward_only_frames_give_the_state_but_no_gradient():
    config = tiny_config()
    model = tiny_sequence_model(config, seed=5)
    x = np.random.default_rng(2).normal(size=(2, FRAMES, 24, 32, 3)).astype(np.float32)
    trainer = WindowTrainer(model, config.model, forward_only=CUT)

    whole, whole_probs = _grads(model, x)
    cut, cut_probs = _grads(trainer, x)
    # The same outputs (the state crosses the cut), in training and inference.
    np.testing.assert_allclose(cut_probs, whole_probs, atol=1e-6)
    np.testing.assert_allclose(np.asarray(trainer(x)), np.asarray(model(x)), atol=1e-6)
    # The whole window's backward pass reaches every frame; the truncated one stops at the cut.
    assert np.all(whole[:CUT] > 0)
    assert np.all(cut[:CUT] == 0)
    assert np.all(cut[CUT:] > 0)
    np.testing.assert_allclose(cut[-3:], whole[-3:], rtol=1e-4)  # no path through the head
    # Training the trainer trains the model: the same variables.
    assert {id(v) for v in trainer.trainable_variables} == {
        id(v) for v in model.trainable_variables
    }


def test_forward_only_frames_need_the_model_config():
    model = tiny_sequence_model(tiny_config(), seed=1)
    with pytest.raises(ConfigError, match='model config'):
        WindowTrainer(model, None, forward_only=3)


def test_window_policies_train_their_k_frames_whole_whatever_the_lstm_recipe_says():
    from dataclasses import replace

    from malpi_ros.learn.train import window_dataset

    recipe = DatasetConfig(state='zero', burn_in=110, seq_len=10, bptt=40)
    said = []
    windows = window_dataset(replace(tiny_config(), window=3), recipe, said.append)
    assert (windows.window, windows.bptt, windows.forward_only) == (3, 0, 0)
    assert said  # the change of recipe is logged
    assert window_dataset(tiny_config(), recipe, said.append) is recipe
