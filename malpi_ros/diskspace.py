"""Room on disk: how much is free, a check before a long job writes, and what "full" looks like.

A full disk must be one line that names the path, never a traceback after an hour of training
or a SIGBUS from a memory-mapped file whose pages the filesystem cannot back. Pure Python.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from malpi_ros.errors import MalpiError, StorageError

# What a write raises when there is no room: a full disk, a quota, a file-size limit.
ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_ROOM_TEXTS = ('No space left on device', 'Disk quota exceeded', 'File too large')


def out_of_room(err: BaseException) -> bool:
    """True when ``err`` (or an error it was raised from) says the disk or a quota is full.

    Libraries that write through C code (TensorFlow's SavedModel) raise their own types with
    the OS message in the text, so the text is checked as well as ``errno``.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in ROOM_ERRNOS:
            return True
        if any(text in str(current) for text in _ROOM_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False


@contextmanager
def full_disk_is_one_line(where: str) -> Iterator[None]:
    """Turn an out-of-room error raised inside the block into one StorageError naming
    ``where``; every other error passes unchanged."""
    try:
        yield
    except MalpiError:
        raise
    except Exception as err:  # libraries write through their own error types
        if out_of_room(err):
            raise StorageError(f'{where}: no room to write: {_first_line(err)}') from err
        raise


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent: where a directory not yet made will live."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem that holds ``path``."""
    return shutil.disk_usage(_existing(Path(path))).free


def check_room(needs: Mapping[str | Path, int], what: str) -> None:
    """StorageError unless each filesystem has room for what will be written on it.

    ``needs``: path -> bytes to be written there; paths on one filesystem are added up.
    """
    by_device: dict[int, tuple[list[str], int, Path]] = {}
    for path, size in needs.items():
        where = _existing(Path(path))
        device = where.stat().st_dev
        names, total, _ = by_device.get(device, ([], 0, where))
        by_device[device] = ([*names, str(path)], total + int(size), where)
    for names, total, where in by_device.values():
        free = free_bytes(where)
        if total > free:
            raise StorageError(
                f'not enough room for {what}: {", ".join(names)} need about {_mb(total)}, '
                f'{_mb(free)} free there; free some space or choose another place'
            )


def preallocate(path: str | Path) -> None:
    """Reserve the blocks of a file that is about to be written through a memory map.

    A memory-mapped file is sparse until its pages are written; if the disk fills up then, the
    write is a SIGBUS (the process dies with "Bus error"). ``posix_fallocate`` asks for every
    block now, so a full disk is an OSError (ENOSPC) here, at the start, for the caller to
    name. Filesystems that cannot preallocate are left as they are.
    """
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    finally:
        os.close(fd)


def _mb(size: int) -> str:
    return f'{size / 1e6:.1f} MB'
