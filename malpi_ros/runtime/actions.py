"""Recorded commands to action labels, action indices to commands, and choosing an action.

Commands are compared in the table's normalized space (linear / max_linear, angular /
max_angular) so that 1 rad/s and 0.3 m/s weigh alike; otherwise angular speed, numerically
larger, would decide every label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from malpi_ros.config import ActionTable
from malpi_ros.errors import ConfigError, DatasetError, MalpiError

SELECTION_MODES = ('argmax', 'sample', 'epsilon_greedy')


def _normalized_actions(table: ActionTable) -> np.ndarray:
    return np.array(
        [(a.linear_x / table.max_linear, a.angular_z / table.max_angular) for a in table.actions],
        dtype=np.float64,
    )


def labels_for(linear: np.ndarray, angular: np.ndarray, table: ActionTable) -> np.ndarray:
    """Action indices (int64, the inputs' broadcast shape) of recorded commands.

    A command shorter than ``table.dead_zone`` (normalized) is "no command" → the stop action;
    otherwise the nearest action wins, ties going to the lowest index (np.argmin's rule).
    """
    lin = np.asarray(linear, dtype=np.float64)
    ang = np.asarray(angular, dtype=np.float64)
    try:
        lin, ang = np.broadcast_arrays(lin, ang)
    except ValueError as err:
        raise DatasetError(
            f'linear and angular commands have shapes {lin.shape} and {ang.shape}'
        ) from err
    bad = ~(np.isfinite(lin) & np.isfinite(ang))
    if bad.any():
        first = np.unravel_index(int(np.argmax(bad)), bad.shape)
        where = tuple(int(i) for i in first)
        raise DatasetError(
            f'{int(bad.sum())} of {bad.size} commands are not finite; first at index {where}: '
            f'linear_x={float(lin[first])!r}, angular_z={float(ang[first])!r}'
        )
    points = np.stack([lin / table.max_linear, ang / table.max_angular], axis=-1)
    targets = _normalized_actions(table)
    distance2 = np.square(points[..., np.newaxis, :] - targets).sum(axis=-1)
    nearest = np.argmin(distance2, axis=-1)
    idle = np.hypot(points[..., 0], points[..., 1]) < table.dead_zone
    return np.asarray(np.where(idle, table.stop_index, nearest), dtype=np.int64)


def label_for(linear_x: float, angular_z: float, table: ActionTable) -> int:
    """The action index of one recorded command (see ``labels_for``)."""
    if not (math.isfinite(linear_x) and math.isfinite(angular_z)):
        raise DatasetError(f'command linear_x={linear_x!r}, angular_z={angular_z!r} is not finite')
    x, z = np.float64(linear_x), np.float64(angular_z)  # numpy scalars broadcast as arrays
    return int(labels_for(x, z, table))  # type: ignore[arg-type]


def twist_for(index: int, table: ActionTable) -> tuple[float, float]:
    """(linear_x, angular_z) of action ``index``; negative indices are errors, not from the end."""
    size = len(table)
    if isinstance(index, bool) or not isinstance(index, int | np.integer) or not 0 <= index < size:
        raise ConfigError(
            f'action index must be an integer in [0, {size}) for a table of {size} actions '
            f'({", ".join(table.names)}), got {index!r}'
        )
    action = table.actions[int(index)]
    return float(action.linear_x), float(action.angular_z)


@dataclass(frozen=True)
class ActionSelector:
    """How the robot picks an action from the policy's probabilities.

    ``argmax`` drives deterministically; ``sample`` draws from the probabilities (explores the
    way the policy is unsure); ``epsilon_greedy`` takes a uniformly random action with
    probability ``epsilon``, else argmax. The config fields are frozen; the random generator
    (seeded by ``seed``, so runs repeat) is kept beside them, not as a field, so ``to_dict``
    and equality see only the config. ``reset()`` restarts the random sequence.
    """

    mode: str = 'argmax'
    epsilon: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in SELECTION_MODES:
            raise ConfigError(
                f'selection mode must be one of {", ".join(SELECTION_MODES)}, got {self.mode!r}'
            )
        eps = self.epsilon
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0.0 <= eps <= 1.0:
            raise ConfigError(f'epsilon must be a probability in [0, 1], got {eps!r}')
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f'seed must be an integer >= 0, got {self.seed!r}')
        self.reset()

    def reset(self) -> None:
        """Restart the random sequence from ``seed``."""
        object.__setattr__(self, '_rng', np.random.default_rng(self.seed))

    def select(self, probabilities: np.ndarray) -> int:
        """The chosen action index for one vector of (not necessarily normalized) probabilities."""
        p = np.asarray(probabilities, dtype=np.float64)
        if p.ndim != 1 or p.size == 0:
            raise MalpiError(f'expected a 1-D vector of action probabilities, got shape {p.shape}')
        if not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
            raise MalpiError(
                f'action probabilities must be finite, >= 0 and not all 0, got {p.tolist()}'
            )
        rng: np.random.Generator = self._rng  # type: ignore[attr-defined]
        if self.mode == 'sample':
            return int(rng.choice(p.size, p=p / p.sum()))
        if self.mode == 'epsilon_greedy' and rng.random() < self.epsilon:
            return int(rng.integers(p.size))
        return int(np.argmax(p))
