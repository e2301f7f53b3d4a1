"""PNG figures for people, written one way: matplotlib's Agg backend, saved, always closed.

matplotlib is imported when a figure is made (it costs ~0.5 s and the robot never needs it),
with the non-interactive Agg backend, so plotting works on a headless robot or CI machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only: never look for a display)."""
    import matplotlib

    matplotlib.use('Agg', force=True)
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def figure(path: str | Path, dpi: int = 100, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """``with figure(path, figsize=...) as (fig, axes):`` draw; on leaving the block the figure
    is laid out and written to ``path`` as a PNG, and closed whatever happened (pyplot keeps
    every open figure alive)."""
    plt = pyplot()
    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(Path(path), dpi=dpi)
    finally:
        plt.close(fig)
