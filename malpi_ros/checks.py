"""Checks for the ``__post_init__`` of config dataclasses: one wording for every module.

Each raises ConfigError with what was received (house style: ``max_linear must be > 0, got
-1``). A bool is never a number here: YAML's ``yes`` must not pass for 1.
"""

from __future__ import annotations

import math
from typing import Any

from malpi_ros.errors import ConfigError


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def positive(name: str, value: Any) -> None:
    if not (is_number(value) and value > 0):
        raise ConfigError(f'{name} must be > 0, got {value!r}')


def non_negative(name: str, value: Any) -> None:
    if not (is_number(value) and value >= 0):
        raise ConfigError(f'{name} must be >= 0, got {value!r}')


def in_range(name: str, value: Any, low: float, high: float = math.inf) -> None:
    if not (is_number(value) and low <= value <= high):
        bounds = f'in [{low}, {high}]' if math.isfinite(high) else f'>= {low}'
        raise ConfigError(f'{name} must be a number {bounds}, got {value!r}')


def flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f'{name} must be true or false, got {value!r}')


def int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f'{name} must be an integer >= {low}, got {value!r}')


def one_of(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f'{name} must be one of {", ".join(choices)}, got {value!r}')
