"""The model bundle: one directory with everything needed to run a trained policy correctly.

``model.keras`` (the sequence model), ``step.tflite`` (the LiteRT step model) and
``metadata.json`` (the policy config — input size, normalization, action table —, the frame
period ``dt`` and window length it was trained at, the training bags with their hashes, metrics,
versions, file checksums and the LiteRT I/O). DESIGN §3. ``malpi-ros export BUNDLE --int8``
may add ``step_int8.tflite``, a quantized step model; every model file's entry in ``files``
says its precision (and the int8 one how it was quantized and how well it agreed with fp32).

Loading never imports TensorFlow (the robot's LiteRT process must not pay for it). Saving needs
it to write the model files, so ``save_bundle`` lives in ``learn/export.py``; the atomic swap,
the checks and the metadata it writes are here, beside the loader that reads them.
A bundle that is missing, truncated or inconsistent is refused with a ``BundleError`` naming
the file and the field.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from malpi_ros.config import PolicyConfig, from_dict
from malpi_ros.errors import BundleError, ConfigError

FORMAT = 'malpi_ros.bundle'
FORMAT_VERSION = 1
METADATA_FILE = 'metadata.json'
KERAS_FILE = 'model.keras'
TFLITE_FILE = 'step.tflite'
INT8_FILE = 'step_int8.tflite'
MODEL_FILES = (KERAS_FILE, TFLITE_FILE)  # every bundle has these; INT8_FILE is optional
PRECISIONS = ('fp32', 'int8')  # Policy.from_bundle(precision=...), policy_node's precision
# file -> the precision its entry in metadata.json field files must state. Bundles saved before
# precisions were recorded have no 'precision' in their entries: theirs is fp32.
FILE_PRECISION = {KERAS_FILE: 'fp32', TFLITE_FILE: 'fp32', INT8_FILE: 'int8'}
STEP_FILES = {'fp32': TFLITE_FILE, 'int8': INT8_FILE}  # precision -> LiteRT step model
QUANTIZATIONS = ('full_integer', 'dynamic_range')  # how an int8 step model was made
CHECKSUM_FIELD = 'metadata_sha256'  # sha256 of metadata.json's own content, this field left out
MAX_METADATA_BYTES = 16 << 20  # a metadata.json is a few KB; refuse to parse a huge one


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

    @property
    def precisions(self) -> tuple[str, ...]:
        """The step-model precisions this bundle holds (fp32 always; int8 once exported)."""
        return tuple(p for p in PRECISIONS if STEP_FILES[p] in self.metadata['files'])

    def step_path(self, precision: str = 'fp32') -> Path:
        """The LiteRT step model of ``precision``; BundleError when the bundle has none."""
        name = STEP_FILES[check_precision(precision)]
        if name not in self.metadata['files']:
            raise BundleError(
                f'{self.path / name}: no {precision} step model in this bundle ({METADATA_FILE} '
                f'field files lists {sorted(self.metadata["files"])}); add one with: '
                f'malpi-ros export {self.path} --int8'
            )
        return self.path / name


def check_precision(precision: object) -> str:
    """``precision`` if it is one of ``PRECISIONS``, else a ConfigError saying what it got."""
    if precision not in PRECISIONS:
        raise ConfigError(f'precision must be one of {", ".join(PRECISIONS)}, got {precision!r}')
    return str(precision)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (model files reach tens of MB)."""
    digest = hashlib.sha256()
    with Path(path).open('rb') as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def metadata_digest(metadata: Mapping[str, Any]) -> str:
    """sha256 of the metadata as canonical JSON (sorted keys, no spaces), its own field left
    out: an edited ``dt`` or action table no longer loads silently. Not a signature: anyone
    who edits the file can recompute it (README "Reliability")."""
    body = {key: value for key, value in metadata.items() if key != CHECKSUM_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(',', ':'), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def checkpoint(step: str) -> None:
    """A named step of ``save_bundle``; tests replace this to fail (or look) at each step."""


def file_entry(path: Path, **info: Any) -> dict[str, Any]:
    """A ``files`` entry: sha256, size, the precision the file's name implies, and ``info``."""
    entry = {'sha256': sha256_file(path), 'bytes': path.stat().st_size, **info}
    if path.name in FILE_PRECISION:
        entry.setdefault('precision', FILE_PRECISION[path.name])
    return entry


def check_extra_files(extra_files: Mapping[str, str | Path]) -> dict[str, Path]:
    """Plain, non-clashing names of existing files: checked before anything is written."""
    reserved = {METADATA_FILE, *FILE_PRECISION}
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


def check_replaceable(path: Path) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise BundleError(f'{path}: exists and is not a directory; not replacing it')
    if any(path.iterdir()) and not (path / METADATA_FILE).is_file():
        raise BundleError(
            f'{path}: exists and is not a bundle (no {METADATA_FILE}); not replacing'
        )


def write_json(path: Path, data: dict[str, Any]) -> None:
    with path.open('w') as f:
        json.dump(data, f, indent=2, allow_nan=False)
        f.write('\n')
        f.flush()
        os.fsync(f.fileno())


# -- the swap: at every instant ``path`` names a complete bundle, the old one or the new one --

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_LEFTOVER_KINDS = ('tmp', 'old')


def leftover_name(path: Path, kind: str) -> Path:
    """``.NAME.tmp-PID-HEX`` beside ``path``: the pid tells a crashed save from a running one."""
    return path.parent / f'.{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}'


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux ``renameat2(RENAME_EXCHANGE)``, glibc >= 2.28).

    False where the call or the filesystem does not support it; the caller falls back.
    """
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f'cannot swap {a} and {b}: {os.strerror(code)}')


def swap_in(tmp: Path, path: Path) -> None:
    """Replace ``path`` by ``tmp``; the old bundle, swapped out to ``tmp``'s name, is deleted.

    With ``renameat2(RENAME_EXCHANGE)`` the two directories trade places in one step, so
    ``path`` is never absent. Without it (not Linux, or a filesystem that lacks it), the old
    bundle is renamed aside first and ``path`` is absent between two renames; a crash there is
    repaired by ``recover_leftovers`` on the next load or save.
    """
    if not path.exists():
        tmp.rename(path)
    elif _exchange(tmp, path):
        checkpoint('swapped')
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        old = leftover_name(path, 'old')
        path.rename(old)
        checkpoint('old-aside')
        try:
            tmp.rename(path)
        except BaseException:
            old.rename(path)
            raise
        checkpoint('swapped')
        shutil.rmtree(old, ignore_errors=True)
    checkpoint('cleaned')
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # make renames durable where the OS allows it
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(directory: Path) -> None:
    """Every file of the new bundle on disk before it is swapped in (a power cut after the
    swap must not leave a bundle of empty files)."""
    for file in directory.iterdir():
        with contextlib.suppress(OSError), file.open('rb') as stream:
            os.fsync(stream.fileno())
    _fsync_dir(directory)


def add_model_file(path: str | Path, source: str | Path, name: str, **info: Any) -> Path:
    """Put ``source`` into the bundle at ``path`` as ``name`` (one of ``FILE_PRECISION``,
    e.g. the int8 step model), listed in ``files`` with its sha256, precision and ``info``.

    Atomic like a save: the bundle is copied into a temp dir beside it, the file and the new
    metadata (its checksum recomputed, checked as the loader checks it) are written there, and
    the copy is swapped in. A crash leaves the bundle as it was. Needs no TensorFlow.
    """
    path = Path(path)
    if name not in FILE_PRECISION or name in MODEL_FILES:
        extra = sorted(set(FILE_PRECISION) - set(MODEL_FILES))
        raise ConfigError(f'name must be one of {extra}, got {name!r}')
    current = load_bundle(path)  # never extend a bundle that would not load
    tmp = leftover_name(path, 'tmp')
    try:
        shutil.copytree(path, tmp)
        checkpoint('copied')
        shutil.copyfile(source, tmp / name)
        metadata = dict(current.metadata)
        metadata['files'] = {**metadata['files'], name: file_entry(tmp / name, **info)}
        metadata[CHECKSUM_FIELD] = metadata_digest(metadata)
        check_metadata(tmp / METADATA_FILE, metadata)
        write_json(tmp / METADATA_FILE, metadata)
        fsync_tree(tmp)
        checkpoint('metadata')
        swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not saving this bundle now: a leftover of ours is stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(path: Path) -> list[tuple[str, Path]]:
    """(kind, directory) of what crashed saves of ``path`` left beside it; a running save's
    temp directory (its pid is alive) is not one."""
    found = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    for kind in _LEFTOVER_KINDS:
        prefix = f'.{path.name}.{kind}-'
        for entry in entries:
            if not entry.name.startswith(prefix):
                continue
            tag = entry.name[len(prefix) :]
            pid = tag.split('-')[0] if '-' in tag else ''
            if entry.is_dir() and not (pid.isdigit() and _alive(int(pid))):
                found.append((kind, entry))
    return sorted(found, key=lambda item: item[1].name)


def _complete(directory: Path) -> bool:
    try:
        load_bundle(directory, verify=True, recover=False)
    except BundleError:
        return False
    return True


def recover_leftovers(path: str | Path) -> list[str]:
    """Repair and clean what a crashed save of ``path`` left; returns what was done.

    If ``path`` is missing (a crash between the fallback's two renames), the newest complete
    bundle left beside it — the new one if it was finished, else the old one — is moved back
    to ``path``. Every other leftover is deleted.
    """
    path = Path(path)
    done = []
    leftovers = _leftovers(path)
    if not path.exists():
        complete = [d for kind, d in leftovers if _complete(d)]
        # A finished new bundle beats the old one it was replacing.
        complete.sort(key=lambda d: (d.name.startswith(f'.{path.name}.tmp-'), d.stat().st_mtime))
        if complete:
            complete[-1].rename(path)
            done.append(f'restored {path} from {complete[-1].name}')
    for _, directory in leftovers:
        if directory.exists():
            shutil.rmtree(directory, ignore_errors=True)
            done.append(f'removed {directory.name}')
    return done


def load_bundle(path: str | Path, *, verify: bool = True, recover: bool = True) -> Bundle:
    """Load and check a bundle directory; ``BundleError`` naming file and field if it is bad.

    ``verify`` checks the model files' sha256 against the metadata (catches truncated or
    replaced files; ~0.1 s for the default model). ``recover``: a bundle missing at ``path``
    after a crashed save is first restored from what the save left (``recover_leftovers``).
    """
    path = Path(path)
    if recover and not path.exists() and _leftovers(path):
        recover_leftovers(path)
    if not path.is_dir():
        raise BundleError(f'{path}: no bundle directory there')
    meta_path = path / METADATA_FILE
    metadata = _read_metadata(meta_path)
    try:
        config = check_metadata(meta_path, metadata)
        digest = metadata_digest(metadata)
    except (RecursionError, ValueError) as err:
        raise BundleError(f'{meta_path}: cannot check its content: {err}') from err
    if metadata[CHECKSUM_FIELD] != digest:
        raise BundleError(
            f'{meta_path}: field {CHECKSUM_FIELD}: does not match the content (edited or '
            'corrupted after it was saved)'
        )
    for name in metadata['files']:  # check_metadata: the model files, and the int8 one if any
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


def _read_metadata(meta_path: Path) -> Any:
    """metadata.json parsed; every way it can be unreadable is one BundleError naming it."""
    try:
        with meta_path.open('rb') as stream:
            data = stream.read(MAX_METADATA_BYTES + 1)
    except FileNotFoundError as err:
        raise BundleError(f'{meta_path}: missing; not a model bundle') from err
    except OSError as err:
        raise BundleError(f'{meta_path}: cannot read: {err}') from err
    if len(data) > MAX_METADATA_BYTES:
        raise BundleError(f'{meta_path}: larger than {MAX_METADATA_BYTES} bytes; not metadata')
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError as err:
        raise BundleError(
            f'{meta_path}: not UTF-8 text ({err.reason} at byte {err.start})'
        ) from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise BundleError(f'{meta_path}: invalid JSON: {err}') from err
    except RecursionError as err:
        raise BundleError(f'{meta_path}: JSON nested too deeply to be metadata') from err


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
    CHECKSUM_FIELD: (str,),
}


def check_metadata(meta_path: Path, metadata: Any) -> PolicyConfig:
    """Every field present with its type, the config valid and consistent with the rest."""

    def bad(field: str, why: str) -> BundleError:
        return BundleError(f'{meta_path}: field {field}: {why}')

    if not isinstance(metadata, dict):
        raise BundleError(f'{meta_path}: must hold a JSON object, got {type(metadata).__name__}')
    for field, types in _FIELDS.items():
        if field not in metadata:
            if field == CHECKSUM_FIELD:  # the first landing's bundles: say what to do
                raise bad(
                    field, 'missing (a bundle saved before metadata checksums: train it again)'
                )
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
    unknown = sorted(set(metadata['files']) - set(FILE_PRECISION))
    if unknown:
        raise bad('files', f'lists {unknown}; a bundle holds only {sorted(FILE_PRECISION)}')
    for name in (*MODEL_FILES, *(n for n in metadata['files'] if n not in MODEL_FILES)):
        entry = metadata['files'].get(name)
        if not isinstance(entry, dict):
            raise bad(f'files.{name}', f'missing or not an object: {entry!r}')
        _check_precision(name, entry, bad)
        if not (isinstance(entry.get('sha256'), str) and len(entry['sha256']) == 64):
            raise bad(f'files.{name}.sha256', f'must be a hex sha256, got {entry.get("sha256")!r}')
        size = entry.get('bytes')
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise bad(f'files.{name}.bytes', f'must be an integer > 0, got {size!r}')
    _check_quantized_from(metadata['files'], bad)
    _check_tflite_io(metadata['tflite_io'], config, bad)
    return config


def _check_precision(name: str, entry: dict[str, Any], bad: Any) -> None:
    """A file's stated precision is the one its role has: an int8 file listed as the fp32 step
    model (or the reverse) would run the robot on the wrong model under the right name."""
    precision = entry.get('precision', 'fp32' if name in MODEL_FILES else None)
    if precision != FILE_PRECISION[name]:
        want = FILE_PRECISION[name]
        raise bad(f'files.{name}.precision', f'must be {want!r}, got {precision!r}')
    if name == INT8_FILE and entry.get('quantization') not in QUANTIZATIONS:
        raise bad(
            f'files.{name}.quantization',
            f'must be one of {", ".join(QUANTIZATIONS)}, got {entry.get("quantization")!r}',
        )


def _check_quantized_from(files: dict[str, Any], bad: Any) -> None:
    """The int8 step model names the ``model.keras`` it was quantized from: an int8 file of
    another model with the same shapes (copied in, the metadata resealed) is refused, not run
    as this bundle's."""
    entry = files.get(INT8_FILE)
    if entry is None:
        return
    source = files[KERAS_FILE]['sha256']
    if entry.get('quantized_from') != source:
        raise bad(
            f'files.{INT8_FILE}.quantized_from',
            f"{entry.get('quantized_from')!r} is not this bundle's {KERAS_FILE} ({source}): "
            f'made from another model; export again',
        )


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
