"""The conv+LSTM policy: one builder for the sequence model (training) and the step model (robot).

The sequence model takes ``(batch, T, H, W, C)`` and is stateless; the step model takes one
frame plus the LSTM state ``(h, c)`` explicitly and returns the next state (DESIGN §2). Both are
made of the *same layer objects*, so the step model runs the trained weights without a copy or
a file round trip, and stepping T frames from a zero state reproduces the T sequence outputs.

Time is folded into the batch (``FoldTime`` / ``UnfoldTime``) instead of ``TimeDistributed``,
which gave wrong shapes from ``predict()`` at a T other than the one it was fit at (DESIGN §2).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import keras
from keras import layers, ops

from malpi_ros.config import ModelConfig
from malpi_ros.errors import BundleError, ConfigError

SEQUENCE_INPUT = 'frames'
STEP_INPUTS = ('frame', 'h', 'c')
STEP_OUTPUTS = ('probs', 'h_next', 'c_next')


@keras.saving.register_keras_serializable(package='malpi_ros')
class FoldTime(layers.Layer):
    """(B, T, ...) -> (B*T, ...): lets per-frame layers run on every frame of every sequence."""

    def call(self, x: Any) -> Any:
        return ops.reshape(x, (-1, *x.shape[2:]))

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        b, t = input_shape[0], input_shape[1]
        bt = None if b is None or t is None else b * t
        return (bt, *input_shape[2:])


@keras.saving.register_keras_serializable(package='malpi_ros')
class UnfoldTime(layers.Layer):
    """(B*T, F) -> (B, T, F), with B and T read at run time from the sequence input ``like``."""

    def call(self, features: Any, like: Any) -> Any:
        shape = ops.shape(like)
        return ops.reshape(features, (shape[0], shape[1], features.shape[-1]))

    def compute_output_shape(self, features_shape: tuple, like_shape: tuple) -> tuple:
        return (like_shape[0], like_shape[1], features_shape[-1])


def _frame_layers(cfg: ModelConfig) -> list[layers.Layer]:
    """The per-frame encoder: the conv stack and the flatten, named stably for weight lookups."""
    convs: list[layers.Layer] = [
        layers.Conv2D(
            spec.filters,
            spec.kernel,
            strides=spec.stride,
            activation=cfg.conv_activation,
            name=f'conv_{i}',
        )
        for i, spec in enumerate(cfg.convs)
    ]
    return [*convs, layers.Flatten(name='flatten')]


def _encode(frame_layers: list[layers.Layer], x: Any) -> Any:
    """Run the per-frame encoder; the one place both models pass frames through it."""
    for layer in frame_layers:
        x = layer(x)
    return x


def build_sequence_model(cfg: ModelConfig) -> keras.Model:
    """The training model: (batch, T, H, W, C) float32 -> (batch, T, actions) softmax.

    Any batch and any T; every sequence starts from a zero LSTM state.
    """
    frames = keras.Input(shape=(None, *cfg.input_shape), name=SEQUENCE_INPUT, dtype='float32')
    folded = FoldTime(name='fold_time')(frames)
    features = _encode(_frame_layers(cfg), folded)
    sequence = UnfoldTime(name='unfold_time')(features, like=frames)
    lstm = layers.LSTM(
        cfg.lstm_units, activation=cfg.lstm_activation, return_sequences=True, name='lstm'
    )(sequence)
    probs = layers.Dense(cfg.num_actions, activation='softmax', name='policy')(lstm)
    return keras.Model(frames, probs, name='malpi_sequence')


def _shared_layers(
    cfg: ModelConfig, sequence_model: keras.Model
) -> tuple[list[layers.Layer], layers.LSTM, layers.Dense]:
    """The sequence model's own layer objects (not copies), checked against the config."""
    try:
        frame_layers = [sequence_model.get_layer(f'conv_{i}') for i in range(len(cfg.convs))]
        frame_layers.append(sequence_model.get_layer('flatten'))
        lstm = sequence_model.get_layer('lstm')
        dense = sequence_model.get_layer('policy')
    except ValueError as err:
        raise ConfigError(
            f'model {sequence_model.name!r} was not built by build_sequence_model: {err}'
        ) from err
    if lstm.units != cfg.lstm_units or dense.units != cfg.num_actions:
        raise ConfigError(
            f'model has lstm {lstm.units} units and {dense.units} actions, the config '
            f'{cfg.lstm_units} and {cfg.num_actions}'
        )
    if tuple(sequence_model.input_shape[2:]) != cfg.input_shape:
        raise ConfigError(
            f'model input is {sequence_model.input_shape[2:]}, the config {cfg.input_shape}'
        )
    return frame_layers, lstm, dense


def build_step_model(cfg: ModelConfig, sequence_model: keras.Model) -> keras.Model:
    """The robot model: (frame, h, c) -> (probs, h_next, c_next), one frame per call.

    Made of ``sequence_model``'s layers (the LSTM's cell for one step), so it shares the very
    same weight variables: training the sequence model updates this model too.
    """
    frame_layers, lstm, dense = _shared_layers(cfg, sequence_model)
    frame = keras.Input(shape=cfg.input_shape, name='frame', dtype='float32')
    h = keras.Input(shape=(cfg.lstm_units,), name='h', dtype='float32')
    c = keras.Input(shape=(cfg.lstm_units,), name='c', dtype='float32')
    features = _encode(frame_layers, frame)
    out, (h_next, c_next) = lstm.cell(features, [h, c])
    probs = dense(out)
    outputs = {
        'probs': layers.Identity(name='probs')(probs),
        'h_next': layers.Identity(name='h_next')(h_next),
        'c_next': layers.Identity(name='c_next')(c_next),
    }
    return keras.Model({'frame': frame, 'h': h, 'c': c}, outputs, name='malpi_step')


def _stateful_inputs(
    cfg: ModelConfig, frame_layers: list[layers.Layer], name: str
) -> tuple[Any, Any, Any, Any]:
    """Inputs frames (B, T, H, W, C), h, c, and the per-frame features (B, T, F) of the frames:
    the start of every sequence model whose initial state is an input."""
    frames = keras.Input(shape=(None, *cfg.input_shape), name=SEQUENCE_INPUT, dtype='float32')
    h = keras.Input(shape=(cfg.lstm_units,), name='h', dtype='float32')
    c = keras.Input(shape=(cfg.lstm_units,), name='c', dtype='float32')
    folded = FoldTime(name=f'fold_time_{name}')(frames)
    sequence = UnfoldTime(name=f'unfold_time_{name}')(_encode(frame_layers, folded), like=frames)
    return frames, h, c, sequence


def build_carried_model(cfg: ModelConfig, sequence_model: keras.Model) -> keras.Model:
    """The training model for a state carried across chunks (truncated BPTT):
    {frames (B, T, H, W, C), h, c} -> {probs (B, T, actions), h_next, c_next}.

    The sequence model with its initial state as an input and its final state as an output,
    made of ``sequence_model``'s layers (the LSTM's own cell), so training it trains the
    bundle's sequence and step models. From a zero state it gives the sequence model's
    outputs.
    """
    frame_layers, lstm, dense = _shared_layers(cfg, sequence_model)
    frames, h, c, sequence = _stateful_inputs(cfg, frame_layers, 'carried')
    carried = layers.RNN(lstm.cell, return_sequences=True, return_state=True, name='lstm_carried')
    out, h_next, c_next = carried(sequence, initial_state=[h, c])
    outputs = {
        'probs': layers.Identity(name='probs')(dense(out)),
        'h_next': layers.Identity(name='h_next')(h_next),
        'c_next': layers.Identity(name='c_next')(c_next),
    }
    return keras.Model({SEQUENCE_INPUT: frames, 'h': h, 'c': c}, outputs, name='malpi_carried')


class _StatesOut(layers.Layer):
    """An RNN cell that runs ``cell`` and outputs its new state ``[h, c]`` (concatenated)
    instead of ``h``: the LSTM state after every frame, from one sequence call."""

    def __init__(self, cell: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cell = cell
        self.state_size = cell.state_size
        self.output_size = 2 * cell.units

    def call(self, inputs: Any, states: Any, training: Any = None) -> tuple[Any, Any]:
        _, new_states = self.cell(inputs, states, training=training)
        return ops.concatenate(list(new_states), axis=-1), new_states


def build_state_model(cfg: ModelConfig, sequence_model: keras.Model) -> keras.Model:
    """The LSTM state along sequences: {frames (B, T, H, W, C), h, c} -> (B, T, 2*units),
    ``[h, c]`` after each frame, from ``sequence_model``'s own layers and weights.

    What the int8 export calibrates on (``learn/quantize.py``): the states the trained model
    really passes through on recordings, not guesses of their range.
    """
    frame_layers, lstm, _ = _shared_layers(cfg, sequence_model)
    frames, h, c, sequence = _stateful_inputs(cfg, frame_layers, 'states')
    states = layers.RNN(_StatesOut(lstm.cell), return_sequences=True, name='lstm_states')(
        sequence, initial_state=[h, c]
    )
    return keras.Model({SEQUENCE_INPUT: frames, 'h': h, 'c': c}, states, name='malpi_states')


def compile_for_training(model: keras.Model, learning_rate: float = 3e-4) -> keras.Model:
    """A minimal compile (Adam, per-step sparse cross-entropy) for tests and quick runs."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss='sparse_categorical_crossentropy',
        metrics=['accuracy'],
    )
    return model


def load_sequence_model(path: str | Path, cfg: ModelConfig) -> keras.Model:
    """Load a ``.keras`` sequence model in safe mode (no code from the file) and check it
    matches ``cfg``; anything wrong is a BundleError naming the file."""
    try:
        model = keras.saving.load_model(str(path), compile=False, safe_mode=True)
        _shared_layers(cfg, model)
    except ConfigError as err:
        raise BundleError(f'{path}: model does not match the bundle config: {err}') from err
    except (ValueError, OSError, TypeError, zipfile.BadZipFile) as err:
        raise BundleError(f'{path}: cannot load the Keras model: {err}') from err
    return model
