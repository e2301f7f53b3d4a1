"""One module per `malpi-ros` verb (see malpi_ros.cli), and the argument types they share."""

from __future__ import annotations

import argparse
import math


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f'expected a number, got {text!r}') from err
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f'expected a finite number, got {text!r}')
    return value


def positive_number(text: str) -> float:
    """argparse type: a finite number > 0 (a rate, a duration in seconds)."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be > 0, got {text!r}')
    return value


def non_negative_number(text: str) -> float:
    """argparse type: a finite number >= 0 (an offset in seconds)."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be >= 0, got {text!r}')
    return value


def fraction(text: str) -> float:
    """argparse type: a finite number in [0, 1] (a share of frames)."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f'must be in [0, 1], got {text!r}')
    return value
