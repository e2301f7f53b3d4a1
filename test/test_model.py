"""The one builder: sequence model (any batch, any T) and step model sharing its layers.

Parity is the contract (DESIGN §2): stepping T frames from a zero state reproduces the
sequence model's T outputs. Also checked: the model trains at several batch sizes and T, and
``predict()`` agrees with direct calls at other T (the ``TimeDistributed`` trap).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from modelfactory import TINY_UNITS, tiny_config, tiny_sequence_model

from malpi_ros.config import ModelConfig
from malpi_ros.errors import ConfigError
from malpi_ros.learn.model import (
    build_sequence_model,
    build_step_model,
    compile_for_training,
    load_sequence_model,
)

CONFIG = tiny_config()
H, W, C = CONFIG.model.input_shape
A = CONFIG.model.num_actions


def _frames(batch: int, steps: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, steps, H, W, C), dtype=np.float32)


def _step_through(step_model: keras.Model, frames: np.ndarray) -> np.ndarray:
    """(B, T, H, W, C) -> (B, T, A) by stepping the step model from a zero state."""
    batch = frames.shape[0]
    h = np.zeros((batch, TINY_UNITS), np.float32)
    c = np.zeros((batch, TINY_UNITS), np.float32)
    out = []
    for t in range(frames.shape[1]):
        res = step_model({'frame': frames[:, t], 'h': h, 'c': c})
        h, c = np.asarray(res['h_next']), np.asarray(res['c_next'])
        out.append(np.asarray(res['probs']))
    return np.stack(out, axis=1)


@pytest.fixture(scope='module')
def model() -> keras.Model:
    return tiny_sequence_model(CONFIG, seed=0)


def test_sequence_model_shapes_names_and_no_time_distributed(model):
    assert model.input_shape == (None, None, H, W, C)
    assert model.output_shape == (None, None, A)
    names = [layer.name for layer in model.layers]
    assert names == [
        'frames',
        'fold_time',
        'conv_0',
        'conv_1',
        'flatten',
        'unfold_time',
        'lstm',
        'policy',
    ]
    assert not any(isinstance(layer, keras.layers.TimeDistributed) for layer in model.layers)
    out = np.asarray(model(_frames(3, 4)))
    assert out.shape == (3, 4, A)
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, atol=1e-5)


def test_step_model_shares_the_very_same_layers_and_variables(model):
    step = build_step_model(CONFIG.model, model)
    assert step.get_layer('conv_0') is model.get_layer('conv_0')
    assert step.get_layer('policy') is model.get_layer('policy')
    step_vars = {id(v) for v in step.weights}
    assert step_vars == {id(v) for v in model.weights}
    assert set(step.input) == {'frame', 'h', 'c'}
    assert set(step.output) == {'probs', 'h_next', 'c_next'}


def test_stepping_from_zero_state_reproduces_the_sequence_outputs(model):
    frames = _frames(2, 40, seed=1)
    want = np.asarray(model(frames))
    got = _step_through(build_step_model(CONFIG.model, model), frames)
    assert np.max(np.abs(got - want)) <= 1e-5
    # The state matters: the last frame alone from zero state gives something else.
    alone = np.asarray(model(frames[:, -1:]))[:, 0]
    assert np.max(np.abs(alone - want[:, -1])) > 1e-3


def test_trains_at_several_batch_sizes_and_lengths_then_predicts_at_any_length():
    model = tiny_sequence_model(CONFIG, seed=3)
    step = build_step_model(CONFIG.model, model)  # built before training: must follow it
    compile_for_training(model, learning_rate=1e-2)
    before = [w.copy() for w in model.get_weights()]
    rng = np.random.default_rng(0)
    for batch, steps in ((1, 5), (8, 17), (8, 5), (1, 17)):
        x = _frames(8, steps, seed=steps)
        y = rng.integers(0, A, (8, steps))
        hist = model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
        assert np.isfinite(hist.history['loss'][0])
    changed = [not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True)]
    assert all(changed)
    for steps in (1, 3, 37, 301):
        x = _frames(2, steps, seed=100 + steps)
        predicted = model.predict(x, verbose=0, batch_size=2)
        direct = np.asarray(model(x))
        assert predicted.shape == direct.shape == (2, steps, A)
        assert np.max(np.abs(predicted - direct)) <= 1e-5
        assert model.evaluate(x, np.zeros((2, steps)), verbose=0)[0] > 0
    frames = _frames(1, 12, seed=7)
    got = _step_through(step, frames)
    assert np.max(np.abs(got - np.asarray(model(frames)))) <= 1e-5


def test_safe_mode_reload_gives_the_same_model(model, tmp_path):
    path = tmp_path / 'm.keras'
    model.save(path)
    loaded = load_sequence_model(str(path), CONFIG.model)
    frames = _frames(1, 9, seed=2)
    assert np.array_equal(np.asarray(loaded(frames)), np.asarray(model(frames)))


def test_step_model_refuses_a_model_that_does_not_match_the_config(model):
    other = ModelConfig(height=H, width=W, convs=CONFIG.model.convs, lstm_units=16)
    with pytest.raises(ConfigError, match='lstm 8 units'):
        build_step_model(other, model)
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ConfigError, match='not built by build_sequence_model'):
        build_step_model(CONFIG.model, plain)


def test_default_config_builds_the_malpi_architecture():
    model = build_sequence_model(ModelConfig())
    shapes = [model.get_layer(f'conv_{i}').output.shape[1:] for i in range(3)]
    assert shapes == [(29, 29, 16), (13, 13, 32), (11, 11, 64)]
    assert model.get_layer('lstm').units == 128
    assert model.output_shape == (None, None, 5)
