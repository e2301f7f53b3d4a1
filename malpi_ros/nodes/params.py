"""One row of a node's parameter table: pure, so tables sit beside each node's frozen config.

Every node of ours reads its parameters from a ``name -> ParamSpec`` table, once at start-up,
into a frozen config; ``runner.declare_parameters`` turns each row into a read-only
``ParameterDescriptor`` (a value changed later would be silently ignored, so a
``ros2 param set`` is refused instead). The launch-file and config tests read the tables
without a ROS graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ParamSpec:
    """One ROS parameter: default, description, and an inclusive range for numbers (an
    integer range when the default is an int, else a floating-point one)."""

    default: Any
    description: str
    low: float | None = None
    high: float | None = None
