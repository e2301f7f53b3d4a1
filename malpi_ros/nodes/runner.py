"""How every malpi_ros node process runs, from rclpy.init to its last words.

One loop for policy_node, motor_driver_node and sim_node: start rclpy without its signal
handlers (``malpi_ros.signals`` says why), build the node (a ``MalpiError`` — bad parameter,
bad bundle, missing motor library — is one fatal log line and exit code 2), spin until
SIGINT/SIGTERM or an external shutdown, then wait for running callbacks and let the node say
its last words (``close()``: a zero Twist, stopped motors, a final progress report) before the
context goes down. Our signal handlers stay installed until those last words are said: a second
Ctrl-C during the (bounded) clean-up is noted, not a KeyboardInterrupt that would skip the rest
of it (releasing the motor backend, say).

Also here, for every node: ``declare_parameters`` (a node's ``ParamSpec`` table, declared
read-only), ``steady_timer`` (timers that no clock source can stop) and ``freeze_use_sim_time``
(the clock source is chosen at start, like every other parameter).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import rclpy
from builtin_interfaces.msg import Time
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
)
from rclpy.callback_groups import CallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import ParameterException
from rclpy.executors import Executor, ExternalShutdownException, SingleThreadedExecutor
from rclpy.logging import get_logger
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions
from rclpy.timer import Timer

from malpi_ros.errors import ConfigError, MalpiError
from malpi_ros.nodes.params import ParamSpec
from malpi_ros.signals import stop_on_signals

SPIN_SLICE = 0.1  # s: how often the loop looks at the stop flag
CALLBACK_DRAIN = 5.0  # s: how long running callbacks may take to finish at shutdown


class ClosingNode(Protocol):
    """A node with last words: ``close()`` is called once, after callbacks stopped, while the
    context is up; ``last_words`` says in the log what it does."""

    last_words: str

    def close(self) -> None: ...


def descriptor(name: str, spec: ParamSpec) -> ParameterDescriptor:
    """The read-only descriptor of one table row, with its range."""
    extra: dict[str, Any] = {}
    if spec.low is not None and spec.high is not None:
        if isinstance(spec.default, int) and not isinstance(spec.default, bool):
            extra['integer_range'] = [
                IntegerRange(from_value=int(spec.low), to_value=int(spec.high), step=1)
            ]
        else:
            extra['floating_point_range'] = [
                FloatingPointRange(from_value=float(spec.low), to_value=float(spec.high))
            ]
    # Read once at start-up: read-only, so `ros2 param set` is refused instead of ignored.
    return ParameterDescriptor(name=name, description=spec.description, read_only=True, **extra)


def declare_parameters(node: Node, table: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """Declare every parameter of ``table`` read-only and return the values given at start;
    a rejected value (type, range) is a ``ConfigError`` naming the parameter."""
    values = {}
    for name, spec in table.items():
        try:
            values[name] = node.declare_parameter(name, spec.default, descriptor(name, spec)).value
        except ParameterException as err:
            raise ConfigError(f'parameter {name}: {err}') from err
    return values


def set_time(field: Time, ns: int) -> None:
    """Write a clock stamp in ns (0: the unset, all-zero stamp) into a message's Time field,
    in place (about a quarter of the cost of building a new Time: it runs on every frame)."""
    field.sec, field.nanosec = divmod(int(ns), 1_000_000_000)


def steady_timer(
    node: Node,
    period: float,
    callback: Callable[[], None],
    callback_group: CallbackGroup | None = None,
) -> Timer:
    """A timer on the steady clock: it fires whatever ``use_sim_time`` says.

    A timer on the node's clock stands still under ``use_sim_time`` until ``/clock`` runs (seen:
    the motor watchdog never fired, the wheels kept their last throttle). Safety timers measure
    wall time; what they compare with comes from ``time.monotonic()``, the same clock.
    """
    return node.create_timer(
        period, callback, callback_group, clock=Clock(clock_type=ClockType.STEADY_TIME)
    )


def freeze_use_sim_time(node: Node) -> None:
    """Make ``use_sim_time`` read-only: it is chosen at start (``-p use_sim_time:=true``).

    rclpy declares it writable; switched at run time it would move the node's clock under a
    running frame-age check (a jump to 0 or to another epoch). Refused like our other
    parameters, with rclpy's read-only reason.
    """
    node.set_descriptor(
        'use_sim_time',
        ParameterDescriptor(
            name='use_sim_time',
            type=ParameterType.PARAMETER_BOOL,
            description='frame ages on the /clock topic (read at start; safety timers are '
            'steady whatever this says)',
            read_only=True,
        ),
    )


def run_node(
    name: str,
    factory: Callable[[], Node],
    args: list[str] | None = None,
    executor: Callable[[], Executor] = SingleThreadedExecutor,
) -> None:
    """Run ``factory()``'s node until SIGINT/SIGTERM; exit 2 when it cannot be built."""
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    # The handlers stay for the clean-up too: it is bounded (CALLBACK_DRAIN, the nodes' flush
    # timeouts), and a KeyboardInterrupt inside it would skip the rest (seen: a second Ctrl-C
    # during the driver's final flush gave a traceback and the backend was never released).
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
        seen = stop.signals
        try:
            if stop.signal_name:
                last_words = getattr(node, 'last_words', 'exiting')
                node.get_logger().info(f'{stop.signal_name}: {last_words}')
            # Running callbacks finish first: nothing may publish after the node's last words.
            spinner.shutdown(timeout_sec=CALLBACK_DRAIN)
            close = getattr(node, 'close', None)
            if close is not None:
                close()
            if stop.signals > seen:
                node.get_logger().info(
                    f'{stop.signals - seen} more signal(s) during the clean-up: finished it first'
                )
        finally:
            node.destroy_node()
            rclpy.try_shutdown()
