"""In-test rclpy: a node of the test's own, on a domain of its own, spinning in a thread.

Tests that talk to node processes (started with ``support.running`` under ``support.ros_env()``)
join their graph from the pytest process::

    env = ros_env()
    with graph(int(env['ROS_DOMAIN_ID'])) as g, running([...], env):
        wheels = g.collect(Float32MultiArray, '/motor_driver_node/wheels')
        pub = g.publisher(Twist, 'cmd_vel')
        assert g.wait_matched(pub)
        pub.publish(Twist())
        assert wheels.wait_for(lambda got: len(got) >= 1, timeout=5)

Every ``graph`` has its own ``rclpy.Context`` initialised with the given ``domain_id`` (not the
default context, which would be shared by the whole pytest session, and without rclpy's signal
handlers, so Ctrl-C still stops pytest), its own executor and thread, and is shut down on exit,
so tests never see each other's topics. Discovery stays on localhost: conftest.py sets
``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` for the pytest process.

Callbacks run in the spin thread; ``Inbox`` guards its list with a lock, so tests read it with
``snapshot()`` or ``wait_for()``, never by iterating ``items`` directly.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import rclpy
from rcl_interfaces.msg import SetParametersResult
from rcl_interfaces.srv import SetParameters
from rclpy.context import Context
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.publisher import Publisher
from rclpy.qos import QoSProfile
from rclpy.signals import SignalHandlerOptions

M = TypeVar('M')

_names = itertools.count()

assert os.environ.get('ROS_AUTOMATIC_DISCOVERY_RANGE') == 'LOCALHOST', (
    'in-process rclpy must keep discovery on this machine (conftest.py sets it)'
)


@dataclass
class Received(Generic[M]):
    """One message and the monotonic time it reached the test (for latency checks)."""

    msg: M
    at: float


@dataclass
class Inbox(Generic[M]):
    """Messages of one subscription, in arrival order, with their arrival times."""

    topic: str
    items: list[Received[M]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _changed: threading.Condition = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._changed = threading.Condition(self._lock)

    def _add(self, msg: M) -> None:
        with self._changed:
            self.items.append(Received(msg, time.monotonic()))
            self._changed.notify_all()

    def snapshot(self) -> list[Received[M]]:
        with self._lock:
            return list(self.items)

    def messages(self) -> list[M]:
        return [r.msg for r in self.snapshot()]

    def clear(self) -> None:
        with self._lock:
            self.items.clear()

    def wait_for(self, predicate: Callable[[list[Received[M]]], bool], timeout: float) -> bool:
        """Block until predicate(received so far) is true or timeout passes; the last result."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(list(self.items)):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True


class Graph:
    """A test's node on its own domain; make publishers and collectors with it."""

    def __init__(self, node: Node, executor: SingleThreadedExecutor) -> None:
        self.node = node
        self.context = node.context
        self._executor = executor
        self._added: list[Node] = []

    def add_node(self, node: Node) -> Node:
        """Spin another node (created with ``context=graph.context``) in the same thread.

        For in-process tests of a node class; it is destroyed when the graph closes.
        """
        self._executor.add_node(node)
        self._added.append(node)
        return node

    def collect(self, msg_type: type[M], topic: str, qos: QoSProfile | int = 10) -> Inbox[M]:
        """Subscribe ``topic`` and gather every message into an Inbox (default: reliable, 10)."""
        inbox: Inbox[M] = Inbox(topic)
        self.node.create_subscription(msg_type, topic, inbox._add, qos)
        return inbox

    def publisher(self, msg_type: type[Any], topic: str, qos: QoSProfile | int = 10) -> Publisher:
        return self.node.create_publisher(msg_type, topic, qos)

    def wait_matched(self, pub: Publisher, count: int = 1, timeout: float = 15.0) -> bool:
        """Wait until ``count`` subscriptions match ``pub`` (discovery takes ~0.1-1 s)."""
        deadline = time.monotonic() + timeout
        while pub.get_subscription_count() < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def set_parameter(
        self, node: str, name: str, value: Any, timeout: float = 30.0
    ) -> SetParametersResult:
        """Set a parameter of a running node through its service, as `ros2 param set` does."""
        client = self.node.create_client(SetParameters, f'{node}/set_parameters')
        assert client.wait_for_service(timeout_sec=timeout), f'no {node}/set_parameters service'
        request = SetParameters.Request(
            parameters=[Parameter(name, value=value).to_parameter_msg()]
        )
        future = client.call_async(request)
        deadline = time.monotonic() + 10.0
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert future.done(), f'{node}/set_parameters did not answer'
        [result] = future.result().results
        self.node.destroy_client(client)
        return result

    def wait_publishers(self, topic: str, count: int = 1, timeout: float = 15.0) -> bool:
        """Wait until ``count`` publishers of ``topic`` (a full name) are discovered."""
        deadline = time.monotonic() + timeout
        while self.node.count_publishers(topic) < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True


@contextmanager
def graph(domain_id: int, name: str | None = None) -> Iterator[Graph]:
    """A node named ``name`` (default ``test_graph_N``) spinning in a background thread."""
    context = Context()
    rclpy.init(
        context=context, domain_id=domain_id, signal_handler_options=SignalHandlerOptions.NO
    )
    executor = SingleThreadedExecutor(context=context)
    node = rclpy.create_node(name or f'test_graph_{next(_names)}', context=context)
    executor.add_node(node)

    def spin() -> None:
        with suppress(ExternalShutdownException):  # the context went down first: done
            executor.spin()

    thread = threading.Thread(target=spin, name=f'rosgraph-{domain_id}', daemon=True)
    thread.start()
    g = Graph(node, executor)
    try:
        yield g
    finally:
        # Stop the spin thread before its nodes and context go away under it.
        executor.shutdown(timeout_sec=5.0)
        thread.join(timeout=5.0)
        for added in g._added:
            added.destroy_node()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
