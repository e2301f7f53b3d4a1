"""The demonstrator: pure pursuit along the cued branch, acting only through the action table.

It may look at the world's state (pose, the lap's branch), which the policy may not; but it
acts through the same discrete actions, one per frame, so its recordings are labels the policy
can reproduce exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from malpi_ros.checks import positive
from malpi_ros.config import ActionTable
from malpi_ros.errors import ConfigError
from malpi_ros.sim.robot import Pose, sim_action_table
from malpi_ros.sim.track import BRANCHES, Track


@dataclass(frozen=True)
class ExpertConfig:
    """Pure pursuit's lookahead and the steering rule's threshold, plus the actions it uses.

    The pure-pursuit curvature ``k = 2 * lateral / lookahead**2`` (towards the point
    ``lookahead`` metres ahead on the route) picks ``left`` above ``curvature_threshold``,
    ``right`` below minus it, else ``forward``. With 0.3 m and 1.0 /m the robot steers once the
    target point is ~9 deg off its nose, i.e. ~4.5 cm off the tape on a straight.
    """

    lookahead: float = 0.3
    curvature_threshold: float = 1.0
    forward: str = 'forward'
    left: str = 'left'
    right: str = 'right'

    def __post_init__(self) -> None:
        positive('expert lookahead', self.lookahead)
        positive('expert curvature_threshold', self.curvature_threshold)


class Expert:
    """Chooses one action per frame to follow a branch's route around the loop."""

    def __init__(
        self,
        track: Track,
        actions: ActionTable | None = None,
        config: ExpertConfig | None = None,
    ) -> None:
        self.track = track
        self.actions = actions or sim_action_table()
        self.config = config or ExpertConfig()
        names = self.actions.names
        missing = [
            n for n in (self.config.forward, self.config.left, self.config.right) if n not in names
        ]
        if missing:
            raise ConfigError(f'expert needs actions {missing}, the action table has {names}')
        self._forward = names.index(self.config.forward)
        self._left = names.index(self.config.left)
        self._right = names.index(self.config.right)
        # Arc length along each route, to find the point `lookahead` ahead.
        self._arc = {}
        for branch in BRANCHES:
            route = track.routes[branch]
            seg = np.linalg.norm(np.roll(route, -1, axis=0) - route, axis=1)
            self._arc[branch] = (np.concatenate([[0.0], np.cumsum(seg)[:-1]]), float(seg.sum()))

    def curvature(self, pose: Pose, branch: str) -> float:
        """Pure pursuit's curvature (1/m, + = left) towards the lookahead point on the route."""
        track = self.track
        route = track.routes[branch]
        arc, total = self._arc[branch]
        near = track.nearest(pose.x, pose.y)
        # Index of the route sample at or before the nearest trunk position.
        i = int(np.searchsorted(track.s, near.s, side='right')) - 1
        target_arc = (arc[i] + self.config.lookahead) % total
        j = int(np.searchsorted(arc, target_arc, side='right')) - 1
        k = (j + 1) % len(route)
        step = (arc[k] if k else total) - arc[j]
        t = (target_arc - arc[j]) / step
        target = route[j] + t * (route[k] - route[j])
        dx, dy = target[0] - pose.x, target[1] - pose.y
        # The target in the robot's frame: ahead (+x) and to the left (+y).
        ahead = dx * math.cos(pose.theta) + dy * math.sin(pose.theta)
        lateral = -dx * math.sin(pose.theta) + dy * math.cos(pose.theta)
        dist2 = max(ahead * ahead + lateral * lateral, 1e-9)
        if ahead < 0:  # facing away: turn towards it as hard as the rule allows
            return math.copysign(1e3, lateral if lateral else 1.0)
        return 2.0 * lateral / dist2

    def act(self, pose: Pose, branch: str) -> int:
        """The index, in the action table, of the action to take this frame."""
        if branch not in BRANCHES:
            raise ValueError(f'branch must be one of {BRANCHES}, got {branch!r}')
        k = self.curvature(pose, branch)
        if k > self.config.curvature_threshold:
            return self._left
        if k < -self.config.curvature_threshold:
            return self._right
        return self._forward
