"""Helpers for tests that start real processes on a ROS graph of their own.

Every such test gets a ROS_DOMAIN_ID nobody else in this session uses and localhost-only
discovery, so tests never see each other and nothing leaves the machine.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from malpi_ros import processes
from malpi_ros.processes import stop_process

VENV = Path(sys.prefix)
NODE_DIR = processes.NODE_DIR  # the installed executables (lib/malpi_ros)
SHARE_DIR = processes.SHARE_DIR  # launch/, config/ as installed
REPO = Path(__file__).resolve().parents[1]

# Domain ids 1..100 (Fast DDS's safe range); start at an offset from the pid so that two test
# sessions on one machine are unlikely to share ids, and skip the Makefile's own id.
_domain_ids = itertools.cycle(
    [d for d in range(1, 101) if str(d) != os.environ.get('ROS_DOMAIN_ID')]
)
for _ in range(os.getpid() % 97):
    next(_domain_ids)


def ros_env(domain_id: int | None = None, **extra: str) -> dict[str, str]:
    """An environment for a child process: own domain, localhost discovery, venv on PATH."""
    return processes.ros_env(next(_domain_ids) if domain_id is None else domain_id, **extra)


@contextmanager
def running(
    cmd: list[str], env: dict[str, str], log: Path | None = None
) -> Iterator[subprocess.Popen[str]]:
    """Run a process for the duration of a with-block; SIGINT, then kill, on the way out."""
    out = log.open('w') if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        stop(proc)
        if log is not None:
            out.close()


def stop(proc: subprocess.Popen[str], timeout: float = 10.0) -> int:
    """Ask a process to stop as Ctrl-C would, and kill it if it does not; returns its code."""
    return stop_process(proc, timeout)


def free_ports(count: int) -> list[int]:
    """``count`` TCP ports on 127.0.0.1 that are free now (bound, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(('127.0.0.1', 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll until predicate() is true or timeout seconds pass; returns the last result."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. '256k') mounted at ``path``: a real disk that fills up.

    Needs root with the right to mount (as in the dev container and CI); unmounted on the way
    out, whatever was left on it.
    """
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, f'cannot mount a small tmpfs for this test: {done.stderr}'
    try:
        yield path
    finally:
        subprocess.run(['umount', '-l', str(path)], check=False)


def limit_file_size(max_bytes: int) -> Callable[[], None]:
    """A ``preexec_fn`` that caps every file the child writes at ``max_bytes`` (RLIMIT_FSIZE):
    a write past it fails with EFBIG, as a full disk fails with ENOSPC."""
    import resource

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


def stale_install(source: Path, installed: Path) -> list[str]:
    """Files of the source tree ``source`` that differ from the installed copy ``installed``.

    Tests import the installed package (CMake copies), so an edit not yet installed would be
    silently left untested: every ``.py`` here must match byte for byte, and no ``.py`` may be
    installed that the sources no longer have (a moved module would otherwise keep working).
    The generated messages (``msg/``) exist only in the install and are left out."""
    if source.resolve() == installed.resolve():
        return []
    differ = []
    for src in sorted(source.rglob('*.py')):
        rel = src.relative_to(source)
        dst = installed / rel
        if not dst.is_file():
            differ.append(f'{rel} (not installed)')
        elif dst.read_bytes() != src.read_bytes():
            differ.append(f'{rel} (changed)')
    for dst in sorted(installed.rglob('*.py')):
        rel = dst.relative_to(installed)
        if rel.parts[0] != 'msg' and not (source / rel).is_file():
            differ.append(f'{rel} (installed, not in the sources)')
    return differ
