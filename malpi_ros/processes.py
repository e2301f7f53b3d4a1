"""Child processes that must stop the way a person stops them: Ctrl-C first.

Our nodes answer SIGINT with their last words (a zero Twist, stopped motors, a closed bag) and
exit 0; only a process that hangs past ``timeout`` is killed.
"""

from __future__ import annotations

import signal
import subprocess
from typing import Any


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int:
    """SIGINT, wait up to ``timeout`` seconds, then kill; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)
