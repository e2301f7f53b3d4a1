"""policy_node's stepping thread (runtime.newest): the newest frame wins, nothing runs after stop.

Pure: plain callables and events stand in for frames and steps; every wait has a generous
timeout, and the order of events is forced with events, not with sleeps.
"""

from __future__ import annotations

import threading

from malpi_ros.runtime.newest import NewestWorker

WAIT = 10.0  # s: generous, for a loaded machine; the events make the order, not the timing


def test_an_item_offered_while_one_runs_waits_and_a_newer_one_replaces_it():
    started, release, done = threading.Event(), threading.Event(), threading.Event()
    handled: list[int] = []

    def handle(item: int) -> None:
        handled.append(item)
        if item == 1:
            started.set()
            assert release.wait(WAIT)
        if item == 3:
            done.set()

    worker = NewestWorker(handle, on_error=lambda err: None)
    try:
        assert worker.offer(1) is False  # nothing was waiting
        assert started.wait(WAIT)  # 1 runs and blocks
        assert worker.offer(2) is False  # waits in the slot
        assert worker.offer(3) is True  # replaces 2, which is never handled
        release.set()
        assert done.wait(WAIT)
        assert handled == [1, 3]
    finally:
        assert worker.stop(WAIT)


def test_stop_lets_the_running_item_finish_drops_the_waiting_one_and_refuses_more():
    started, release = threading.Event(), threading.Event()
    handled: list[int] = []

    def handle(item: int) -> None:
        handled.append(item)
        started.set()
        assert release.wait(WAIT)

    worker = NewestWorker(handle, on_error=lambda err: None)
    worker.offer(1)
    assert started.wait(WAIT)
    worker.offer(2)  # waiting when stop comes: dropped
    assert worker.stop(0.05) is False  # 1 is still running: stop says so
    release.set()
    assert worker.stop(WAIT) is True
    assert worker.offer(3) is False
    assert handled == [1]  # nothing after stop: not 2, not 3


def test_a_handler_that_raises_is_reported_and_the_worker_goes_on():
    errors: list[BaseException] = []
    failed, done = threading.Event(), threading.Event()

    def on_error(err: BaseException) -> None:
        errors.append(err)
        failed.set()

    def handle(item: int) -> None:
        if item == 1:
            raise RuntimeError('boom')
        done.set()

    worker = NewestWorker(handle, on_error=on_error)
    try:
        worker.offer(1)
        assert failed.wait(WAIT)  # 2 only after 1 failed, so it cannot replace 1
        worker.offer(2)
        assert done.wait(WAIT)
        assert [str(e) for e in errors] == ['boom']
    finally:
        assert worker.stop(WAIT)
