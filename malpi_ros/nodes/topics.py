"""The rclpy side of recorded topics, shared by the recorder, the player and replay-eval.

Message classes by type name, QoS profiles both ways (rclpy <-> the bag's metadata, the
player's ``TopicQos``), the RIHS01 hash a publisher announces, and the player's waits.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rosbags.interfaces import (
    Qos,
    QosDurability,
    QosHistory,
    QosLiveliness,
    QosReliability,
    QosTime,
)

from malpi_ros.bagio.replay import TopicQos
from malpi_ros.bagio.writer import split_type
from malpi_ros.errors import BagError

DEPTH = 100  # subscription history: room for a burst while the writer is busy
SETTLE = 0.3  # s after the publisher sees a subscriber (seen: with 0 the first frames were lost)
MAX_WAIT_STEP = 0.1  # s: the longest uninterrupted sleep (a stop request is seen within it)
_INFINITE_NS = 2**63 - 1  # rmw's "infinite" duration
_INFINITE_QOS_TIME = QosTime(2147483647, 4294967295)  # how rosbag2 writes it


def message_class(msgtype: str) -> type:
    """The rclpy message class of ``pkg/msg/Name`` (needed for type support, even when raw)."""
    package, kind, name = split_type(msgtype)
    try:
        return getattr(importlib.import_module(f'{package}.{kind}'), name)
    except (ImportError, AttributeError) as err:
        raise BagError(
            f'cannot subscribe to {msgtype}: its Python package is missing: {err}'
        ) from err


def _qos_time(duration: Any) -> QosTime:
    ns = int(getattr(duration, 'nanoseconds', duration))
    if ns >= _INFINITE_NS or ns < 0:
        return _INFINITE_QOS_TIME
    return QosTime(ns // 1_000_000_000, ns % 1_000_000_000)


def _enum(cls: Any, policy: Any, default: Any) -> Any:
    try:
        return cls(int(policy))
    except ValueError:
        return default


def to_bag_qos(profile: QoSProfile) -> Qos:
    """An rclpy QoS profile as rosbags writes it into the bag's metadata."""
    return Qos(
        history=_enum(QosHistory, profile.history, QosHistory.UNKNOWN),
        depth=int(profile.depth),
        reliability=_enum(QosReliability, profile.reliability, QosReliability.UNKNOWN),
        durability=_enum(QosDurability, profile.durability, QosDurability.UNKNOWN),
        deadline=_qos_time(profile.deadline),
        lifespan=_qos_time(profile.lifespan),
        liveliness=_enum(QosLiveliness, profile.liveliness, QosLiveliness.UNKNOWN),
        liveliness_lease_duration=_qos_time(profile.liveliness_lease_duration),
        avoid_ros_namespace_conventions=bool(profile.avoid_ros_namespace_conventions),
    )


def subscription_qos(offered: Sequence[QoSProfile]) -> QoSProfile:
    """The QoS that receives from every publisher: reliable/transient-local only if all are."""
    reliable = bool(offered) and all(p.reliability == ReliabilityPolicy.RELIABLE for p in offered)
    latched = bool(offered) and all(
        p.durability == DurabilityPolicy.TRANSIENT_LOCAL for p in offered
    )
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=DEPTH,
        reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE,
    )


def announced_rihs01(type_hash: Any) -> str | None:
    """'RIHS01_<hex>' of an rclpy TypeHash, or None when the publisher announced none."""
    if type_hash is None or getattr(type_hash, 'version', -1) != 1:
        return None
    value = bytes(type_hash.value)
    return f'RIHS01_{value.hex()}' if any(value) else None


def qos_profile(qos: TopicQos) -> QoSProfile:
    """The rclpy profile of a ``TopicQos``."""
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=qos.depth,
        reliability=ReliabilityPolicy.RELIABLE if qos.reliable else ReliabilityPolicy.BEST_EFFORT,
        durability=(
            DurabilityPolicy.TRANSIENT_LOCAL if qos.transient_local else DurabilityPolicy.VOLATILE
        ),
    )


def wait_until(deadline: float, stop: threading.Event, clock: Callable[[], float]) -> bool:
    """Sleep until ``clock() >= deadline``; False when ``stop`` was set first."""
    while True:
        left = deadline - clock()
        if left <= 0:
            return not stop.is_set()
        if stop.wait(min(left, MAX_WAIT_STEP)):
            return False
