"""Tiny random-weight policies and bundles for tests: 24x32 input, two small convs, 8 LSTM units.

Builds and saves in about a second. The weights are random but scaled up so that the outputs
are far from uniform and depend on the state: a test that compares outputs can then fail.

    from modelfactory import make_tiny_bundle
    bundle_dir = make_tiny_bundle(tmp_path / 'bundle')
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from malpi_ros.config import ActionTable, ConvSpec, PolicyConfig

TINY_CONVS = (ConvSpec(4, 4, 2), ConvSpec(8, 3, 2))
TINY_UNITS = 8


def tiny_config(
    height: int = 24, width: int = 32, actions: ActionTable | None = None
) -> PolicyConfig:
    """A consistent PolicyConfig for the tiny model."""
    return PolicyConfig.sized(
        height,
        width,
        convs=TINY_CONVS,
        lstm_units=TINY_UNITS,
        actions=actions if actions is not None else ActionTable(),
    )


def tiny_sequence_model(config: PolicyConfig, seed: int = 0) -> Any:
    """A built sequence model with seeded random weights, sharpened (see module doc)."""
    import keras
    import numpy as np

    from malpi_ros.learn.model import build_sequence_model

    keras.utils.set_random_seed(seed)
    model = build_sequence_model(config.model)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.name in ('lstm', 'policy') or layer.name.startswith('conv_'):
            weights = [w * 3.0 for w in layer.get_weights()]
            # Non-zero biases too: a zero frame still gives a state to carry.
            weights[-1] = weights[-1] + rng.normal(0, 0.3, weights[-1].shape).astype('float32')
            layer.set_weights(weights)
    return model


def make_tiny_bundle(
    path: str | Path,
    *,
    seed: int = 0,
    height: int = 24,
    width: int = 32,
    actions: ActionTable | None = None,
    dt: float = 0.1,
    always: str | None = None,
    sources: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Build a tiny random policy and save it as a bundle at ``path``; returns the path.

    ``always``: an action name the policy then picks on every frame (its output layer ignores
    the state), for tests that need a robot that keeps driving. ``sources``: the training
    recordings to list (``malpi-ros export`` reads them), else a synthetic placeholder;
    ``extra``: the metadata's ``extra`` (what training records there: ``dataset``, ``train``).
    """
    from malpi_ros.learn.export import save_bundle

    config = tiny_config(height, width, actions)
    model = tiny_sequence_model(config, seed)
    if always is not None:
        layer = model.get_layer('policy')
        kernel, bias = layer.get_weights()
        bias[:] = -20.0
        bias[config.actions.names.index(always)] = 20.0
        layer.set_weights([kernel * 0.0, bias])
    return save_bundle(
        path,
        model,
        config,
        dt=dt,
        seq_len=10,
        sources=sources or [{'path': 'synthetic', 'sha256': '0' * 64}],
        metrics={'note': 'random weights (test/modelfactory.py)', 'seed': seed},
        extra=extra,
    )
