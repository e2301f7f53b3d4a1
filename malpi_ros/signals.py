"""SIGINT and SIGTERM as a flag, for processes that must finish their own way on Ctrl-C.

rclpy's own handlers shut the ROS context down inside the handler, before a node could publish
its last zero Twist or close a bag. Our handlers only set an Event; the main loop waits on it in
short slices (Python runs handlers between bytecodes, in the main thread).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class StopRequest(threading.Event):
    """An Event set by SIGINT/SIGTERM; ``signal_name`` says which arrived first, ``signals``
    how many arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.signal_name: str | None = None
        self.signals = 0


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """A StopRequest set by SIGINT or SIGTERM while the block runs (main thread only).

    The previous handlers come back on exit: a clean-up that must not be cut short by a second
    Ctrl-C belongs inside the block (``spin_node.run_node`` does that).
    """
    stop = StopRequest()

    def request_stop(signum: int, _frame: object) -> None:
        if stop.signal_name is None:
            stop.signal_name = signal.Signals(signum).name
        stop.signals += 1
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
