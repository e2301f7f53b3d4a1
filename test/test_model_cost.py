"""model_cost: FLOPs and weight bytes per frame from the config, against a hand count and the
parameters Keras builds for the same config."""

from __future__ import annotations

from malpi_ros.config import ConvSpec, ModelConfig
from malpi_ros.model_cost import count_flops, weight_bytes

TINY = ModelConfig(
    height=12, width=16, channels=3, convs=(ConvSpec(4, 3, 2),), lstm_units=5, num_actions=3
)


def test_flops_are_counted_layer_by_layer():
    # conv 5x7 outputs x 4 filters x 3x3x3 taps; the LSTM's 4 gates over 140 features + 5 units.
    assert count_flops(TINY) == {
        'conv_0': 2 * 5 * 7 * 4 * 3 * 3 * 3,
        'lstm': 2 * 4 * 5 * (5 * 7 * 4 + 5),
        'policy': 2 * 5 * 3,
    }
    # The default model: the LSTM's input is the 11x11x64 of the MaLPi convs on 120x120.
    default = count_flops(ModelConfig())
    assert list(default) == ['conv_0', 'conv_1', 'conv_2', 'lstm', 'policy']
    assert default['lstm'] == 2 * 4 * 128 * (11 * 11 * 64 + 128)
    assert 20e6 < sum(default.values()) < 21e6


def test_weight_bytes_are_the_parameters_keras_builds():
    from malpi_ros.learn.model import build_sequence_model

    for cfg in (
        TINY,
        ModelConfig(
            height=30, width=40, convs=(ConvSpec(8, 4, 2), ConvSpec(16, 3, 2)), lstm_units=16
        ),
    ):
        assert weight_bytes(cfg) == 4 * build_sequence_model(cfg).count_params()
    assert weight_bytes(TINY) == 4 * ((3 * 3 * 3 * 4 + 4) + 4 * 5 * (140 + 5 + 1) + 6 * 3)
