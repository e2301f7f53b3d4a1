"""A worker thread that handles only the newest item offered to it: policy_node's stepping thread.

The node's executor thread only hands each camera frame over (``offer``, microseconds) and goes
back to its services and timers; the step runs here. A frame offered while the previous one is
still being stepped waits in a slot of one, and a newer frame replaces it there (``offer`` says
so): the LSTM steps on the newest frame, as the depth-1 subscription already wants, and a
``~/reset`` or the stop timer never queues behind a step (README, Benchmarks: on 2 cores the
multi-threaded executor's own Python cost was about half the node's CPU per frame).

Pure (no rclpy): tested with plain callables.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar('T')


class NewestWorker(Generic[T]):
    """Runs ``handle(item)`` on its own thread for the newest item offered, one at a time.

    ``handle`` should not raise (a node callback logs, counts and stops on its own errors); if it
    does, ``on_error(err)`` is told and the worker goes on with the next item.
    """

    def __init__(
        self,
        handle: Callable[[T], object],
        on_error: Callable[[BaseException], object],
        name: str = 'newest-worker',
    ) -> None:
        self._handle = handle
        self._on_error = on_error
        self._ready = threading.Condition()
        self._slot: list[T] = []  # at most one item: the newest not yet taken
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def offer(self, item: T) -> bool:
        """Hand ``item`` over; True when it replaced one that had not been taken yet. After
        ``stop`` it is dropped (and False)."""
        with self._ready:
            if self._stopping:
                return False
            replaced = bool(self._slot)
            self._slot[:] = [item]
            self._ready.notify()
        return replaced

    def stop(self, timeout: float) -> bool:
        """Drop any waiting item, let a running ``handle`` finish and end the thread; True if it
        ended within ``timeout`` seconds. Nothing is handled after it returns True."""
        with self._ready:
            self._stopping = True
            self._slot.clear()
            self._ready.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._slot and not self._stopping:
                    self._ready.wait()
                if self._stopping:
                    return
                item = self._slot.pop()
            try:
                self._handle(item)
            except Exception as err:  # the handler's own guard failed: say so, keep stepping
                self._on_error(err)
