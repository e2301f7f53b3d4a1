"""Top-down pictures of runs: trajectories over the floor map, written as PNG.

matplotlib is imported inside the function (it costs ~0.5 s and nothing else needs it), and the
figure is drawn on its own Agg canvas, so no pyplot state or display is involved.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from malpi_ros.sim.track import Track


def plot_trajectories(
    track: Track,
    trajectories: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    title: str | None = None,
    cue: str | None = 'red',
    marks: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Draw each (N, 2) x/y trajectory over the map (carpet in ``cue``'s colour) to ``path``.

    ``marks``: labelled point sets (e.g. where the robot went off the tape), drawn as crosses.
    Returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x0, x1, y0, y1 = track.map_extent
    fig = Figure(figsize=(10, 10 * (y1 - y0) / (x1 - x0) + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(track.raster(cue), extent=(x0, x1, y0, y1), origin='upper')
    start = track.pose_at(0.0)
    ax.annotate(
        'start',
        (start.x, start.y),
        xytext=(0, 12),
        textcoords='offset points',
        ha='center',
        color='yellow',
    )
    ax.plot([start.x, start.x], [start.y - 0.12, start.y + 0.12], color='yellow', lw=2)
    fork = track.pose_at(track.fork_start)
    ax.annotate('fork', (fork.x, fork.y), xytext=(0, -18), textcoords='offset points',
                ha='center', color='yellow')  # fmt: skip
    for label, xy in trajectories.items():
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        ax.plot(xy[:, 0], xy[:, 1], lw=1.2, label=label)
    for label, xy in (marks or {}).items():
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        ax.plot(xy[:, 0], xy[:, 1], 'x', ms=8, mew=2, label=label)
    if trajectories or marks:
        ax.legend(loc='upper right', fontsize=8)
    ax.set_xlabel('x (m)')
    ax.set_ylabel('y (m)')
    ax.set_aspect('equal')
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
