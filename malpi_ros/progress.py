"""Progress bars for the long steps that are not Keras epochs (reading a large recording into
the frame cache, evaluating a bundle over it): tqdm on a terminal, nothing in a log or a pipe,
so CI logs and the demo's files stay line-per-event."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm import tqdm

T = TypeVar('T')


def format_duration(seconds: float) -> str:
    """'45 s', '3.2 min': the time left of a long step, as its progress lines print it."""
    return f'{seconds:.0f} s' if seconds < 90 else f'{seconds / 60:.1f} min'


def progress(
    items: Iterable[T], *, total: int, desc: str, unit: str = 'it', stream: TextIO | None = None
) -> Iterator[T]:
    """``items`` with a bar on ``stream`` (stderr) when it is a terminal; gone when done."""
    stream = stream if stream is not None else sys.stderr
    quiet = not (hasattr(stream, 'isatty') and stream.isatty())
    return iter(
        tqdm(items, total=total, desc=desc, unit=unit, file=stream, disable=quiet, leave=False)
    )


def epoch_lines(log: Callable[[str], None], prefix: str) -> Callable[[str], None]:
    """A training log (``learn.train.train``'s ``log``) that passes on only its per-epoch lines,
    each with the time left, prefixed: the progress of a training inside a longer run."""

    def keep(line: str) -> None:
        if line.startswith('epoch '):
            log(f'{prefix}: {line}')

    return keep
