"""Write the model files of a bundle: the Keras sequence model and the LiteRT step model.

The only bundle code that needs TensorFlow; ``bundle.save_bundle`` imports it lazily so the
robot, which only loads bundles, never pays for TensorFlow.

Conversion route: the step model is tracked by a Keras ``ExportArchive`` with one endpoint
(fixed batch 1, named inputs ``frame, h, c`` and outputs ``probs, h_next, c_next``), written as
a SavedModel and converted with ``TFLiteConverter.from_saved_model``. The named signature is what
the runtime matches tensors by (tensor names alone are ``StatefulPartitionedCall:N``, and h and c
have the same shape). ``from_concrete_functions`` once wrote a file without weights here
(DESIGN §2), so every export is checked against Keras before it is accepted.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from malpi_ros.bundle import KERAS_FILE, TFLITE_FILE
from malpi_ros.config import PolicyConfig
from malpi_ros.errors import BundleError
from malpi_ros.model import build_step_model
from malpi_ros.runtime_litert import SIGNATURE, LiteRTStep

# float32 LiteRT (XNNPACK) vs Keras after a few chained steps: seen ~3e-8; anything near this
# bound is a broken conversion, not rounding.
EXPORT_TOLERANCE = 1e-4


def export_litert(step_model: keras.Model, path: str | Path) -> dict[str, Any]:
    """Convert the step model to a batch-1 ``.tflite`` at ``path``, check it, describe its I/O.

    Raises ``BundleError`` when the converted model does not reproduce Keras.
    """
    path = Path(path)
    frame_shape = tuple(step_model.input['frame'].shape[1:])
    units = step_model.input['h'].shape[-1]
    signature = [
        tf.TensorSpec((1, *frame_shape), tf.float32, name='frame'),
        tf.TensorSpec((1, units), tf.float32, name='h'),
        tf.TensorSpec((1, units), tf.float32, name='c'),
    ]

    def serve(frame: Any, h: Any, c: Any) -> dict[str, Any]:
        out = step_model({'frame': frame, 'h': h, 'c': c}, training=False)
        return {name: out[name] for name in ('probs', 'h_next', 'c_next')}

    archive = keras.export.ExportArchive()
    archive.track(step_model)
    archive.add_endpoint(SIGNATURE, serve, input_signature=signature)
    with tempfile.TemporaryDirectory(prefix='malpi_savedmodel_') as saved:
        archive.write_out(saved, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=[SIGNATURE])
        try:
            flatbuffer = converter.convert()
        except Exception as err:  # the converter raises many unrelated types
            raise BundleError(f'{path}: LiteRT conversion failed: {err}') from err
    path.write_bytes(flatbuffer)
    runtime = LiteRTStep(path, num_threads=1)
    verify_litert(step_model, runtime)
    return runtime.describe()


def verify_litert(step_model: keras.Model, runtime: LiteRTStep, steps: int = 3) -> float:
    """Chain a few random frames through both models; BundleError if they differ.

    Returns the largest difference seen (probabilities and state).
    """
    rng = np.random.default_rng(0)
    units = runtime.units
    h = np.zeros((1, units), np.float32)
    c = np.zeros((1, units), np.float32)
    kh, kc = h, c
    worst = 0.0
    for _ in range(steps):
        frame = rng.random((1, *runtime.frame_shape), dtype=np.float32)
        probs, h, c = runtime.run(frame, h, c)
        ref = step_model({'frame': frame, 'h': kh, 'c': kc}, training=False)
        kh, kc = np.asarray(ref['h_next']), np.asarray(ref['c_next'])
        for name, got, want in (
            ('probs', probs, np.asarray(ref['probs'])[0]),
            ('h_next', h, kh),
            ('c_next', c, kc),
        ):
            if not np.all(np.isfinite(got)):
                raise BundleError(f'{runtime.path}: LiteRT output {name} is not finite: {got}')
            diff = float(np.max(np.abs(got - want)))
            if diff > EXPORT_TOLERANCE:
                raise BundleError(
                    f'{runtime.path}: LiteRT output {name} differs from Keras by {diff:.3g} '
                    f'(> {EXPORT_TOLERANCE}); the conversion is broken'
                )
            worst = max(worst, diff)
    return worst


def write_model_files(
    directory: str | Path, sequence_model: keras.Model, config: PolicyConfig
) -> dict[str, Any]:
    """Write ``model.keras`` and ``step.tflite`` into ``directory``; returns metadata parts.

    The result holds ``tflite_io`` (the LiteRT signature) and ``versions`` (keras, tensorflow).
    """
    directory = Path(directory)
    step_model = build_step_model(config.model, sequence_model)
    sequence_model.save(directory / KERAS_FILE)
    io = export_litert(step_model, directory / TFLITE_FILE)
    return {
        'tflite_io': io,
        'versions': {
            'keras': keras.__version__,
            'tensorflow': tf.__version__,
            'numpy': np.__version__,
            'python': sys.version.split()[0],
        },
    }
