"""The Keras runtime: the step model rebuilt from the bundle's ``model.keras``, one compiled step.

For development machines and checks against training; the robot runs LiteRT. The step is a
``tf.function`` traced once for batch 1: ``predict()`` per frame costs ~20x more (DESIGN §2).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from malpi_ros.config import ModelConfig
from malpi_ros.learn.model import build_step_model, load_sequence_model


class KerasStep:
    """``run(frame, h, c) -> (probs, h_next, c_next)`` through the Keras step model."""

    name = 'keras'

    def __init__(self, sequence_model: keras.Model, cfg: ModelConfig) -> None:
        self.step_model = build_step_model(cfg, sequence_model)
        self.frame_shape = cfg.input_shape
        self.units = cfg.lstm_units
        self.num_actions = cfg.num_actions
        model = self.step_model
        signature = [
            tf.TensorSpec((1, *cfg.input_shape), tf.float32),
            tf.TensorSpec((1, cfg.lstm_units), tf.float32),
            tf.TensorSpec((1, cfg.lstm_units), tf.float32),
        ]

        @tf.function(input_signature=signature, reduce_retracing=True)
        def step(frame: Any, h: Any, c: Any) -> tuple[Any, Any, Any]:
            out = model({'frame': frame, 'h': h, 'c': c}, training=False)
            return out['probs'][0], out['h_next'], out['c_next']

        self._step = step
        self._frame = np.zeros((1, *cfg.input_shape), np.float32)  # run_with's buffer

    @classmethod
    def from_file(cls, path: str | Path, cfg: ModelConfig) -> KerasStep:
        """Load a ``.keras`` sequence model in safe mode (no code from the file) and wrap it."""
        return cls(load_sequence_model(path, cfg), cfg)

    def run(
        self, frame: np.ndarray, h: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """frame (1, H, W, C), h and c (1, units) float32 -> probs (A,), h_next, c_next."""
        probs, h_next, c_next = self._step(
            np.asarray(frame, np.float32), np.asarray(h, np.float32), np.asarray(c, np.float32)
        )
        return probs.numpy(), h_next.numpy(), c_next.numpy()

    def run_with(
        self, fill: Callable[[np.ndarray], object], h: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As ``run``, with ``fill(buffer)`` writing the (H, W, C) frame into a reused buffer."""
        fill(self._frame[0])
        return self.run(self._frame, h, c)
