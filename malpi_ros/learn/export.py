"""Write the model files of a bundle: the Keras sequence model and the LiteRT step model.

``save_bundle`` is here, not in ``runtime/bundle.py``: writing needs TensorFlow, and the
robot, which only loads bundles, must never pay for it.

Conversion route: the step model is tracked by a Keras ``ExportArchive`` with one endpoint
(fixed batch 1, named inputs ``frame, h, c`` and outputs ``probs, h_next, c_next``), written as
a SavedModel and converted with ``TFLiteConverter.from_saved_model``. The named signature is what
the runtime matches tensors by (tensor names alone are ``StatefulPartitionedCall:N``, and h and c
have the same shape). ``from_concrete_functions`` once wrote a file without weights here
(DESIGN §2), so every export is checked against Keras before it is accepted.
"""

from __future__ import annotations

import datetime
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import malpi_ros
from malpi_ros.config import PolicyConfig, to_dict
from malpi_ros.errors import BundleError, ConfigError
from malpi_ros.learn.model import build_step_model
from malpi_ros.runtime import bundle
from malpi_ros.runtime.bundle import KERAS_FILE, TFLITE_FILE
from malpi_ros.runtime.litert import SIGNATURE, LiteRTStep

# float32 LiteRT (XNNPACK) vs Keras after a few chained steps: seen ~3e-8; anything near this
# bound is a broken conversion, not rounding.
EXPORT_TOLERANCE = 1e-4


def convert_step_model(
    step_model: keras.Model,
    path: str | Path,
    configure: Callable[[Any], None] | None = None,
) -> None:
    """Convert the step model to a batch-1 ``.tflite`` at ``path`` (unchecked: see
    ``export_litert``). ``configure(converter)`` may set quantization options first."""
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
        if configure is not None:
            configure(converter)
        try:
            flatbuffer = converter.convert()
        except Exception as err:  # the converter raises many unrelated types
            raise BundleError(f'{path}: LiteRT conversion failed: {err}') from err
    path.write_bytes(flatbuffer)


def export_litert(step_model: keras.Model, path: str | Path) -> dict[str, Any]:
    """Convert the step model to a batch-1 ``.tflite`` at ``path``, check it, describe its I/O.

    Raises ``BundleError`` when the converted model does not reproduce Keras.
    """
    convert_step_model(step_model, path)
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


def save_bundle(
    path: str | Path,
    sequence_model: Any,
    config: PolicyConfig,
    *,
    dt: float,
    seq_len: int,
    sources: Sequence[Mapping[str, Any]] = (),
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, str | Path] | None = None,
) -> Path:
    """Write a bundle to ``path`` atomically; returns the path.

    Everything is written into a temp dir beside ``path`` and swapped in by rename, so a crash
    leaves the previous bundle intact. An existing ``path`` is replaced only if it is a bundle
    (has ``metadata.json``) or empty: a wrong ``--out`` must not delete someone's directory.
    ``sources``: one dict per training bag (e.g. path and sha256). ``metrics`` and ``extra``
    must be JSON-serializable (no NaN). ``extra_files``: name in the bundle -> file to copy
    there (training curves, reports); listed with their sha256 under ``extra_files`` in the
    metadata, for provenance (the loader does not need them).
    """
    path = Path(path)
    if not isinstance(config, PolicyConfig):
        raise ConfigError(f'config must be a PolicyConfig, got {type(config).__name__}')
    if isinstance(dt, bool) or not isinstance(dt, int | float) or not (0 < dt < math.inf):
        raise ConfigError(f'dt must be a finite number of seconds > 0, got {dt!r}')
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f'seq_len must be an integer >= 1, got {seq_len!r}')
    if not all(isinstance(s, Mapping) for s in sources):
        raise ConfigError(f'sources must be a list of dicts, got {list(sources)!r}')
    metadata: dict[str, Any] = {
        'format': bundle.FORMAT,
        'format_version': bundle.FORMAT_VERSION,
        'created': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
        'config': to_dict(config),
        'kind': config.kind,  # 'lstm' (state carried) or 'window' (config.window frames)
        'dt': float(dt),
        'seq_len': seq_len,
        'action_table': [
            {'name': a.name, 'linear_x': a.linear_x, 'angular_z': a.angular_z}
            for a in config.actions.actions
        ],
        'sources': [dict(s) for s in sources],
        'metrics': dict(metrics or {}),
        'extra': dict(extra or {}),
    }
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ConfigError(f'bundle metadata is not JSON-serializable: {err}') from err
    copies = bundle.check_extra_files(extra_files or {})
    bundle.check_replaceable(path)

    path.parent.mkdir(parents=True, exist_ok=True)
    bundle.recover_leftovers(path)
    tmp = bundle.leftover_name(path, 'tmp')
    tmp.mkdir()
    try:
        bundle.checkpoint('created')
        parts = write_model_files(tmp, sequence_model, config)
        bundle.checkpoint('model-files')
        metadata['versions'] = {
            'malpi_ros': malpi_ros.__version__,
            'python': sys.version.split()[0],
            **parts['versions'],
        }
        metadata['tflite_io'] = parts['tflite_io']
        for name, source in copies.items():
            shutil.copyfile(source, tmp / name)
        bundle.checkpoint('extra-files')
        metadata['files'] = {name: bundle.file_entry(tmp / name) for name in bundle.MODEL_FILES}
        metadata['extra_files'] = {name: bundle.file_entry(tmp / name) for name in copies}
        metadata[bundle.CHECKSUM_FIELD] = bundle.metadata_digest(metadata)
        bundle.check_metadata(tmp / bundle.METADATA_FILE, metadata)  # what we write, we can load
        bundle.write_json(tmp / bundle.METADATA_FILE, metadata)
        bundle.fsync_tree(tmp)
        bundle.checkpoint('metadata')
        bundle.swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
