"""The model bundle: one directory with everything needed to run a trained policy correctly.

``model.keras`` (the sequence model), ``step.tflite`` (the LiteRT step model) and
``metadata.json`` (the policy config — input size, normalization, action table —, the frame
period ``dt`` and window length it was trained at, the training bags with their hashes, metrics,
versions, file checksums and the LiteRT I/O). DESIGN §3.

Loading never imports TensorFlow (the robot's LiteRT process must not pay for it). Saving needs
it to write the model files; that part lives in ``export.py`` and is imported only by
``save_bundle``. A bundle that is missing, truncated or inconsistent is refused with a
``BundleError`` naming the file and the field.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import shutil
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import malpi_ros
from malpi_ros.config import PolicyConfig, from_dict, to_dict
from malpi_ros.errors import BundleError, ConfigError

FORMAT = 'malpi_ros.bundle'
FORMAT_VERSION = 1
METADATA_FILE = 'metadata.json'
KERAS_FILE = 'model.keras'
TFLITE_FILE = 'step.tflite'
MODEL_FILES = (KERAS_FILE, TFLITE_FILE)


@dataclass(frozen=True)
class Bundle:
    """A loaded, checked bundle: its config and where its model files are."""

    path: Path
    config: PolicyConfig
    dt: float
    seq_len: int
    metadata: dict[str, Any]
    keras_path: Path
    tflite_path: Path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (model files reach tens of MB)."""
    digest = hashlib.sha256()
    with Path(path).open('rb') as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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
        'format': FORMAT,
        'format_version': FORMAT_VERSION,
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
    copies = _check_extra_files(extra_files or {})
    _check_replaceable(path)

    from malpi_ros import export  # TensorFlow: only when writing

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f'.{path.name}.tmp-{uuid.uuid4().hex[:12]}'
    tmp.mkdir()
    try:
        parts = export.write_model_files(tmp, sequence_model, config)
        metadata['versions'] = {
            'malpi_ros': malpi_ros.__version__,
            'python': sys.version.split()[0],
            **parts['versions'],
        }
        metadata['tflite_io'] = parts['tflite_io']
        for name, source in copies.items():
            shutil.copyfile(source, tmp / name)
        metadata['files'] = {name: _file_entry(tmp / name) for name in MODEL_FILES}
        metadata['extra_files'] = {name: _file_entry(tmp / name) for name in copies}
        _check_metadata(tmp / METADATA_FILE, metadata)  # what we write, we can load
        _write_json(tmp / METADATA_FILE, metadata)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _file_entry(path: Path) -> dict[str, Any]:
    return {'sha256': sha256_file(path), 'bytes': path.stat().st_size}


def _check_extra_files(extra_files: Mapping[str, str | Path]) -> dict[str, Path]:
    """Plain, non-clashing names of existing files: checked before anything is written."""
    reserved = {METADATA_FILE, *MODEL_FILES}
    copies = {}
    for name, source in extra_files.items():
        if (
            not isinstance(name, str)
            or name in reserved
            or name.startswith('.')
            or Path(name).name != name
        ):
            raise ConfigError(
                f'extra file name must be a plain file name other than {sorted(reserved)}, '
                f'got {name!r}'
            )
        if not Path(source).is_file():
            raise ConfigError(f'extra file {name!r}: {source} is not a file')
        copies[name] = Path(source)
    return copies


def _check_replaceable(path: Path) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise BundleError(f'{path}: exists and is not a directory; not replacing it')
    if any(path.iterdir()) and not (path / METADATA_FILE).is_file():
        raise BundleError(
            f'{path}: exists and is not a bundle (no {METADATA_FILE}); not replacing'
        )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with path.open('w') as f:
        json.dump(data, f, indent=2, allow_nan=False)
        f.write('\n')
        f.flush()
        os.fsync(f.fileno())


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace ``path`` by ``tmp``: old aside, new in, old deleted (restored if the swap fails).

    A directory cannot be replaced in one rename; between the two renames ``path`` is briefly
    absent, never half-written.
    """
    old = None
    if path.exists():
        old = path.parent / f'.{path.name}.old-{uuid.uuid4().hex[:12]}'
        path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        if old is not None:
            old.rename(path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(OSError):  # make the renames durable where the OS allows it
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Load and check a bundle directory; ``BundleError`` naming file and field if it is bad.

    ``verify`` checks the model files' sha256 against the metadata (catches truncated or
    replaced files; ~0.1 s for the default model).
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f'{path}: no bundle directory there')
    meta_path = path / METADATA_FILE
    try:
        text = meta_path.read_text()
    except FileNotFoundError as err:
        raise BundleError(f'{meta_path}: missing; not a model bundle') from err
    except OSError as err:
        raise BundleError(f'{meta_path}: cannot read: {err}') from err
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as err:
        raise BundleError(f'{meta_path}: invalid JSON: {err}') from err
    config = _check_metadata(meta_path, metadata)
    for name in MODEL_FILES:
        file = path / name
        expected = metadata['files'][name]
        if not file.is_file():
            raise BundleError(f'{file}: missing (listed in {METADATA_FILE} field files.{name})')
        size = file.stat().st_size
        if size != expected['bytes']:
            raise BundleError(
                f'{file}: {size} bytes, {METADATA_FILE} field files.{name}.bytes says '
                f'{expected["bytes"]} (truncated or replaced)'
            )
        if verify and sha256_file(file) != expected['sha256']:
            raise BundleError(
                f'{file}: sha256 does not match {METADATA_FILE} field files.{name}.sha256 '
                '(corrupted or replaced)'
            )
    return Bundle(
        path=path,
        config=config,
        dt=float(metadata['dt']),
        seq_len=metadata['seq_len'],
        metadata=metadata,
        keras_path=path / KERAS_FILE,
        tflite_path=path / TFLITE_FILE,
    )


# field -> the JSON types it may have
_FIELDS: dict[str, tuple[type, ...]] = {
    'format': (str,),
    'format_version': (int,),
    'created': (str,),
    'config': (dict,),
    'dt': (int, float),
    'seq_len': (int,),
    'action_table': (list,),
    'sources': (list,),
    'metrics': (dict,),
    'extra': (dict,),
    'versions': (dict,),
    'files': (dict,),
    'extra_files': (dict,),
    'tflite_io': (dict,),
}


def _check_metadata(meta_path: Path, metadata: Any) -> PolicyConfig:
    """Every field present with its type, the config valid and consistent with the rest."""

    def bad(field: str, why: str) -> BundleError:
        return BundleError(f'{meta_path}: field {field}: {why}')

    if not isinstance(metadata, dict):
        raise BundleError(f'{meta_path}: must hold a JSON object, got {type(metadata).__name__}')
    for field, types in _FIELDS.items():
        if field not in metadata:
            raise bad(field, 'missing')
        value = metadata[field]
        if isinstance(value, bool) or not isinstance(value, types):
            names = ' or '.join(t.__name__ for t in types)
            raise bad(field, f'must be {names}, got {type(value).__name__} {value!r:.60}')
    if metadata['format'] != FORMAT:
        raise bad('format', f'must be {FORMAT!r}, got {metadata["format"]!r}')
    if metadata['format_version'] != FORMAT_VERSION:
        raise bad(
            'format_version',
            f'this malpi_ros reads version {FORMAT_VERSION}, got {metadata["format_version"]}',
        )
    if not (0 < metadata['dt'] < math.inf):
        raise bad('dt', f'must be > 0 seconds, got {metadata["dt"]!r}')
    if metadata['seq_len'] < 1:
        raise bad('seq_len', f'must be >= 1, got {metadata["seq_len"]!r}')
    try:
        config = from_dict(PolicyConfig, metadata['config'])
    except ConfigError as err:
        raise bad('config', str(err)) from err
    table = [
        {'name': a.name, 'linear_x': a.linear_x, 'angular_z': a.angular_z}
        for a in config.actions.actions
    ]
    if metadata['action_table'] != table:
        raise bad('action_table', f'{metadata["action_table"]} differs from config.actions')
    # Bundles written before window policies have no 'kind': theirs is the LSTM's.
    if metadata.get('kind', 'lstm') != config.kind:
        raise bad('kind', f'{metadata["kind"]!r} differs from config.window {config.window}')
    for name in MODEL_FILES:
        entry = metadata['files'].get(name)
        if not isinstance(entry, dict):
            raise bad(f'files.{name}', f'missing or not an object: {entry!r}')
        if not (isinstance(entry.get('sha256'), str) and len(entry['sha256']) == 64):
            raise bad(f'files.{name}.sha256', f'must be a hex sha256, got {entry.get("sha256")!r}')
        size = entry.get('bytes')
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise bad(f'files.{name}.bytes', f'must be an integer > 0, got {size!r}')
    _check_tflite_io(metadata['tflite_io'], config, bad)
    return config


def _check_tflite_io(io: dict[str, Any], config: PolicyConfig, bad: Any) -> None:
    m = config.model
    want = {
        'inputs': {
            'frame': [1, m.height, m.width, m.channels],
            'h': [1, m.lstm_units],
            'c': [1, m.lstm_units],
        },
        'outputs': {
            'probs': [1, m.num_actions],
            'h_next': [1, m.lstm_units],
            'c_next': [1, m.lstm_units],
        },
    }
    for kind, tensors in want.items():
        found = io.get(kind)
        if not isinstance(found, dict):
            raise bad(f'tflite_io.{kind}', f'missing or not an object: {found!r}')
        for name, shape in tensors.items():
            entry = found.get(name)
            got = entry.get('shape') if isinstance(entry, dict) else None
            if got != shape:
                raise bad(
                    f'tflite_io.{kind}.{name}.shape',
                    f'{got!r} does not match the config (expected {shape})',
                )
