"""What one step of the model costs, from its config alone: FLOPs and weight bytes per frame.

Used where kinds of policy are compared (``make compare``: a window policy of K frames runs the
step model K times a frame) and by the benchmarks (the compute and memory floors). Counts
assume the builder's layers (``learn.model``: valid convolutions, one LSTM, a dense head).
"""

from __future__ import annotations

from malpi_ros.config import ModelConfig


def _conv_outputs(cfg: ModelConfig) -> list[tuple[int, int, int, int]]:
    """(out height, out width, in channels, filters) of each convolution, in order."""
    h, w, c = cfg.input_shape
    shapes = []
    for conv in cfg.convs:
        h, w = (h - conv.kernel) // conv.stride + 1, (w - conv.kernel) // conv.stride + 1
        shapes.append((h, w, c, conv.filters))
        c = conv.filters
    return shapes


def count_flops(cfg: ModelConfig) -> dict[str, int]:
    """Multiply-adds x 2 of one frame's step, layer by layer (``conv_i``, ``lstm``, ``policy``).

    The LSTM's 4 gates: the input and recurrent matmuls (its few elementwise ops per unit, and
    the biases and activations everywhere, are left out).
    """
    flops: dict[str, int] = {}
    shapes = _conv_outputs(cfg)
    for i, (h, w, c, filters) in enumerate(shapes):
        kernel = cfg.convs[i].kernel
        flops[f'conv_{i}'] = 2 * h * w * filters * kernel * kernel * c
    units = cfg.lstm_units
    flops['lstm'] = 2 * 4 * units * (_features(cfg, shapes) + units)
    flops['policy'] = 2 * units * cfg.num_actions
    return flops


def weight_bytes(cfg: ModelConfig) -> int:
    """float32 bytes of every weight and bias (a batch-1 step reads each once per frame)."""
    shapes = _conv_outputs(cfg)
    params = sum(
        cfg.convs[i].kernel ** 2 * c * filters + filters
        for i, (_, _, c, filters) in enumerate(shapes)
    )
    u = cfg.lstm_units
    params += 4 * u * (_features(cfg, shapes) + u + 1) + (u + 1) * cfg.num_actions
    return 4 * params


def _features(cfg: ModelConfig, shapes: list[tuple[int, int, int, int]]) -> int:
    """The flattened encoder output (``shapes``: ``_conv_outputs``): what the LSTM's input
    kernel multiplies."""
    if not shapes:
        return cfg.input_shape[0] * cfg.input_shape[1] * cfg.input_shape[2]
    h, w, _, filters = shapes[-1]
    return h * w * filters
