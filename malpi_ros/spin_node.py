"""How every malpi_ros node process runs, from rclpy.init to its last words.

One loop for policy_node, motor_driver_node and sim_node: start rclpy without its signal
handlers (``malpi_ros.signals`` says why), build the node (a ``MalpiError`` — bad parameter,
bad bundle, missing motor library — is one fatal log line and exit code 2), spin until
SIGINT/SIGTERM or an external shutdown, then wait for running callbacks and let the node say
its last words (``close()``: a zero Twist, stopped motors, a final progress report) before the
context goes down.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Protocol

import rclpy
from rclpy.executors import Executor, ExternalShutdownException, SingleThreadedExecutor
from rclpy.logging import get_logger
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

from malpi_ros.errors import MalpiError
from malpi_ros.signals import stop_on_signals

SPIN_SLICE = 0.1  # s: how often the loop looks at the stop flag
CALLBACK_DRAIN = 5.0  # s: how long running callbacks may take to finish at shutdown


class ClosingNode(Protocol):
    """A node with last words: ``close()`` is called once, after callbacks stopped, while the
    context is up; ``last_words`` says in the log what it does."""

    last_words: str

    def close(self) -> None: ...


def run_node(
    name: str,
    factory: Callable[[], Node],
    args: list[str] | None = None,
    executor: Callable[[], Executor] = SingleThreadedExecutor,
) -> None:
    """Run ``factory()``'s node until SIGINT/SIGTERM; exit 2 when it cannot be built."""
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    with stop_on_signals() as stop:
        try:
            node = factory()
        except MalpiError as err:
            get_logger(name).fatal(str(err))
            rclpy.try_shutdown()
            sys.exit(2)
        spinner = executor()
        spinner.add_node(node)
        try:
            while not stop.is_set() and rclpy.ok():
                spinner.spin_once(timeout_sec=SPIN_SLICE)
        except ExternalShutdownException:
            pass
    try:
        if stop.signal_name:
            last_words = getattr(node, 'last_words', 'exiting')
            node.get_logger().info(f'{stop.signal_name}: {last_words}')
        # Running callbacks finish first: nothing may publish after the node's last words.
        spinner.shutdown(timeout_sec=CALLBACK_DRAIN)
        close = getattr(node, 'close', None)
        if close is not None:
            close()
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
