"""The sequence model run over whole episodes: the reference the step runtimes are checked against.

Training fits the stateless sequence model; the robot steps a separate runtime with the state
held outside. On the same frames, stepping from a zero state must reproduce the sequence model's
outputs (DESIGN §2, "parity is the contract"); ``evaluate`` checks that on recorded data with
``SequenceModel.probabilities``. TensorFlow is imported here, so ``evaluate`` imports this module
only when the check is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from malpi_ros.config import ModelConfig, PreprocessConfig
from malpi_ros.errors import ConfigError
from malpi_ros.learn.model import load_sequence_model
from malpi_ros.runtime.image import normalize

RESET_BATCH = 256  # one-frame sequences per call when every frame starts from a zero state


class SequenceModel:
    """A bundle's ``model.keras``, called directly on (1, T, H, W, C) or (B, 1, H, W, C)."""

    def __init__(self, model: object, model_cfg: ModelConfig) -> None:
        self.model = model
        self.cfg = model_cfg

    @classmethod
    def from_file(cls, path: str | Path, model_cfg: ModelConfig) -> SequenceModel:
        """Load in safe mode (no code from the file) and check it matches the config."""
        return cls(load_sequence_model(path, model_cfg), model_cfg)

    def probabilities(
        self,
        frames: np.ndarray,
        preprocess_cfg: PreprocessConfig,
        *,
        reset_every_frame: bool = False,
        window: int = 0,
    ) -> np.ndarray:
        """float32 (N, actions) for N fitted uint8 frames (N, h, w, c) of one episode.

        Normalized with ``image.normalize``, the function the robot applies. By default the
        episode is ONE sequence from a zero state (the memory: ~N x H x W x C float32 at once);
        ``window`` K makes each frame's output that of the sequence of its last K frames from a
        zero state (a window policy); ``reset_every_frame`` is ``window`` 1, every frame a
        sequence of its own (the no-memory ablation). The model is called directly, not through
        ``predict()`` (DESIGN §2).
        """
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[1:] != self.cfg.input_shape:
            raise ConfigError(
                f'expected frames of shape (N, {", ".join(map(str, self.cfg.input_shape))}), '
                f'got {frames.shape}'
            )
        if len(frames) == 0:
            return np.zeros((0, self.cfg.num_actions), np.float32)
        window = 1 if reset_every_frame else window
        x = normalize(frames, preprocess_cfg)
        # The first K-1 frames have no full window: theirs starts at the episode's start.
        head = len(frames) if window == 0 else min(window - 1, len(frames))
        out = [self._run(x[np.newaxis, :head])[0]] if head else []
        batch = max(1, RESET_BATCH // max(window, 1))
        for start in range(head, len(frames), batch):
            ends = np.arange(start, min(start + batch, len(frames)))
            windows = np.stack([x[end - window + 1 : end + 1] for end in ends])
            out.append(self._run(windows)[:, -1])
        return np.concatenate(out)

    def _run(self, x: np.ndarray) -> np.ndarray:
        model: Any = self.model
        return np.asarray(model(tf.constant(x), training=False), np.float32)
