"""The floor: a closed loop of white tape with one fork, a coloured cue before it, and its map.

Layout (counter-clockwise, metres; the loop is a rounded rectangle)::

        start line (s = 0), driving towards -x
      +-----------<-----------+
      |                       |
      |     left branch       |
      +--> [cue] ----- <=====> --+   bottom straight, driving towards +x
                    right branch

The fork lies on the bottom straight: the tape splits into a LEFT branch (towards the loop's
inside) and a RIGHT branch (outside), mirror images of each other, that rejoin before the next
corner. A coloured carpet under the tape, ``cue_gap`` metres before the fork, says which branch
this lap takes (``CUE_BRANCH``). At the fork both branches look the same and the carpet is
behind the camera, so only memory can tell the way.

Positions along the loop are given by ``s``, the arc length of the *trunk* (the loop with the
fork section replaced by the straight midline between the branches): the two branches share it,
so progress, laps and the fork decision need no branch-specific bookkeeping.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import cv2
import numpy as np

from malpi_ros.checks import int_at_least, positive
from malpi_ros.errors import ConfigError
from malpi_ros.sim.robot import Pose

CUES = ('red', 'blue')
BRANCHES = ('left', 'right')
CUE_BRANCH = {'red': 'left', 'blue': 'right'}
# Saturated and of similar brightness, so the colour (not the brightness) is the message.
CUE_RGB = {'red': (210, 40, 40), 'blue': (40, 70, 215)}
TAPE_RGB = (235, 232, 220)
FLOOR_RGB = (88, 80, 72)


@dataclass(frozen=True)
class TrackConfig:
    """Geometry of the loop, the cue and the fork; map resolution; the floor's texture seed.

    Lengths in metres. The bottom straight holds, in driving order: ``run_in``, the cue carpet
    (``cue_length``), ``cue_gap``, the fork (``fork_rise`` out, ``fork_flat``, ``fork_rise``
    back), ``run_out``. A branch leaves the trunk on a half-cosine, so its tightest radius is
    ``2 * fork_rise**2 / (pi**2 * fork_offset)`` (0.4 m by default).
    """

    corner_radius: float = 0.5
    side_length: float = 0.6
    run_in: float = 0.3
    cue_length: float = 0.5
    cue_width: float = 0.7
    cue_gap: float = 0.45
    fork_rise: float = 0.7
    fork_flat: float = 0.3
    fork_offset: float = 0.25
    run_out: float = 0.3
    tape_width: float = 0.08
    off_track_margin: float = 0.15
    resolution: float = 0.005
    map_margin: float = 1.2
    spacing: float = 0.01
    floor_seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            'corner_radius',
            'cue_length',
            'cue_width',
            'cue_gap',
            'fork_rise',
            'fork_offset',
            'tape_width',
            'off_track_margin',
            'resolution',
            'map_margin',
            'spacing',
        ):
            positive(f'track {name}', getattr(self, name))
        for name in ('side_length', 'run_in', 'fork_flat', 'run_out'):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f'track {name} must be >= 0, got {value!r}')
        int_at_least('track floor_seed', self.floor_seed, 0)
        if self.off_track_margin <= self.tape_width / 2:
            raise ConfigError(
                f'track off_track_margin ({self.off_track_margin}) must exceed half the tape '
                f'width ({self.tape_width / 2}): a robot on the tape would be off-track'
            )
        if self.fork_offset <= self.off_track_margin:
            raise ConfigError(
                f'track fork_offset ({self.fork_offset}) must exceed off_track_margin '
                f'({self.off_track_margin}): driving between the branches must count as off-track'
            )
        if self.cue_width <= self.tape_width:
            raise ConfigError(
                f'track cue_width ({self.cue_width}) must exceed tape_width ({self.tape_width})'
            )
        if self.resolution > self.tape_width / 4:
            raise ConfigError(
                f'track resolution ({self.resolution} m/px) must be <= tape_width / 4 '
                f'({self.tape_width / 4}) so the tape is drawn several pixels wide'
            )
        if self.spacing > 0.05:
            raise ConfigError(f'track spacing must be <= 0.05 m, got {self.spacing!r}')

    @classmethod
    def for_horizon(cls, horizon: str, **overrides: Any) -> TrackConfig:
        """The track with the cue ``HORIZONS[horizon]`` metres before the fork."""
        if horizon not in HORIZONS:
            raise ConfigError(f'horizon must be one of {", ".join(HORIZONS)}, got {horizon!r}')
        return cls(**{'cue_gap': HORIZONS[horizon], **overrides})

    @property
    def straight_length(self) -> float:
        """Length of the bottom (cue + fork) straight; the top straight is as long."""
        return (
            self.run_in
            + self.cue_length
            + self.cue_gap
            + 2 * self.fork_rise
            + self.fork_flat
            + self.run_out
        )


# Memory horizons (``TrackConfig.for_horizon``): metres of tape from the end of the cue carpet
# to the fork. At the expert's ~0.33 m/s and 10 Hz, 'short' (the demo's) is 14-15 frames of
# driving, 'long' 58-60 frames (about 6 s): longer than any window model's few frames.
HORIZONS = {'short': 0.45, 'long': 2.0}


class TrackPoint(NamedTuple):
    """The nearest tape centreline point to a position on the floor."""

    s: float  # trunk arc length of that point, in [0, length)
    distance: float  # metres from the position to the nearest tape centreline
    route: str  # the branch route the nearest segment belongs to (both agree off the fork)
    lateral: float  # signed offset of the position from the trunk at s (+ = left)
    heading: float  # driving direction of the tape there (radians)


def _segments(config: TrackConfig) -> list[tuple[float, float]]:
    """The loop as (length, curvature) pieces, from the start line (mid top straight)."""
    r, quarter = config.corner_radius, math.pi * config.corner_radius / 2
    half_top = config.straight_length / 2
    return [
        (half_top, 0.0),
        (quarter, 1 / r),
        (config.side_length, 0.0),
        (quarter, 1 / r),
        (config.straight_length, 0.0),
        (quarter, 1 / r),
        (config.side_length, 0.0),
        (quarter, 1 / r),
        (half_top, 0.0),
    ]


def _trace(
    pieces: list[tuple[float, float]], start: Pose, s: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Points and headings at arc lengths ``s`` along constant-curvature pieces."""
    xy = np.zeros((len(s), 2))
    heading = np.zeros(len(s))
    x, y, theta = start
    begin = 0.0
    for i, (length, curvature) in enumerate(pieces):
        last = i == len(pieces) - 1
        sel = (s >= begin) & ((s <= begin + length) if last else (s < begin + length))
        u = s[sel] - begin
        if curvature == 0.0:
            xy[sel, 0] = x + u * math.cos(theta)
            xy[sel, 1] = y + u * math.sin(theta)
            heading[sel] = theta
            x, y = x + length * math.cos(theta), y + length * math.sin(theta)
        else:
            r = 1 / curvature
            cx, cy = x - r * math.sin(theta), y + r * math.cos(theta)
            h = theta + u * curvature
            xy[sel, 0] = cx + r * np.sin(h)
            xy[sel, 1] = cy - r * np.cos(h)
            heading[sel] = h
            theta += length * curvature
            x, y = cx + r * math.sin(theta), cy - r * math.cos(theta)
        begin += length
    return xy, np.arctan2(np.sin(heading), np.cos(heading))


class Track:
    """Centrelines (trunk and the two branch routes), distances to them, and the floor map.

    Build it with ``get_track(config)``, which shares one instance (and its rasters) per config.
    """

    def __init__(self, config: TrackConfig) -> None:
        self.config = c = config
        pieces = _segments(c)
        self.length = float(sum(length for length, _ in pieces))
        n = max(16, round(self.length / c.spacing))
        self.s = np.linspace(0.0, self.length, n, endpoint=False)
        top_y = 2 * c.corner_radius + c.side_length
        start = Pose(c.straight_length, top_y, math.pi)
        self.points, self.headings = _trace(pieces, start, self.s)
        self.normals = np.stack([-np.sin(self.headings), np.cos(self.headings)], axis=1)

        bottom = pieces[0][0] + pieces[1][0] + pieces[2][0] + pieces[3][0]
        self.cue_start = bottom + c.run_in
        self.cue_end = self.cue_start + c.cue_length
        self.fork_start = self.cue_end + c.cue_gap
        self.fork_end = self.fork_start + 2 * c.fork_rise + c.fork_flat
        # Where the branch taken is read off: mid-branch, where the two are farthest apart.
        self.decide_s = self.fork_start + c.fork_rise + c.fork_flat / 2

        offset = self.branch_offset(self.s)[:, None] * self.normals
        self.routes = {'left': self.points + offset, 'right': self.points - offset}
        self.route_headings = {b: _headings(self.routes[b]) for b in BRANCHES}

        # Both routes' segments in one array for vectorized nearest-point queries.
        a = np.concatenate([self.routes[b] for b in BRANCHES])
        b = np.concatenate([np.roll(self.routes[r], -1, axis=0) for r in BRANCHES])
        self._seg_a, self._seg_ab = a, b - a
        self._seg_len2 = np.maximum(np.einsum('ij,ij->i', self._seg_ab, self._seg_ab), 1e-12)
        ds = np.diff(np.append(self.s, self.length))
        self._seg_s = np.tile(self.s, 2)
        self._seg_ds = np.tile(ds, 2)
        self._seg_route = np.repeat(np.arange(2), n)

        everything = np.concatenate([self.routes['left'], self.routes['right']])
        lo = everything.min(axis=0) - c.map_margin
        hi = everything.max(axis=0) + c.map_margin
        self.map_shape = (math.ceil((hi[1] - lo[1]) / c.resolution),
                          math.ceil((hi[0] - lo[0]) / c.resolution))  # fmt: skip
        # Map pixel (u, v) has its centre at world (x0 + (u + .5) res, y1 - (v + .5) res):
        # rows grow downwards, so the map reads like a plot with +y up.
        x0 = float(lo[0])
        y1 = float(lo[1]) + self.map_shape[0] * c.resolution
        self.map_extent = (x0, x0 + self.map_shape[1] * c.resolution, float(lo[1]), y1)
        res = c.resolution
        self.world_from_px = np.array(
            [[res, 0.0, x0 + 0.5 * res], [0.0, -res, y1 - 0.5 * res], [0.0, 0.0, 1.0]]
        )
        self.px_from_world = np.linalg.inv(self.world_from_px)
        self._rasters: dict[str | None, np.ndarray] = {}
        self._floor_img: np.ndarray | None = None

    # --- geometry -------------------------------------------------------------------------

    def branch_offset(self, s: np.ndarray | float) -> np.ndarray:
        """How far each branch lies from the trunk at ``s`` (0 off the fork)."""
        c = self.config
        u = np.asarray(s, dtype=float) - self.fork_start
        rise = c.fork_offset * (1 - np.cos(np.pi * np.clip(u, 0, c.fork_rise) / c.fork_rise)) / 2
        back = 2 * c.fork_rise + c.fork_flat - u
        fall = (
            c.fork_offset * (1 - np.cos(np.pi * np.clip(back, 0, c.fork_rise) / c.fork_rise)) / 2
        )
        return np.where(u < c.fork_rise + c.fork_flat / 2, rise, fall)

    def in_fork(self, s: float) -> bool:
        """True where the tape is split into two branches."""
        return self.fork_start < s % self.length < self.fork_end

    def pose_at(self, s: float, branch: str = 'left') -> Pose:
        """The point of ``branch``'s route at trunk position ``s``, facing the way of travel."""
        _check_branch(branch)
        s = float(s) % self.length
        i = int(np.searchsorted(self.s, s, side='right')) - 1
        j = (i + 1) % len(self.s)
        step = (self.s[j] if j else self.length) - self.s[i]
        t = (s - self.s[i]) / step
        route = self.routes[branch]
        xy = route[i] + t * (route[j] - route[i])
        d = route[j] - route[i]
        return Pose(float(xy[0]), float(xy[1]), math.atan2(d[1], d[0]))

    def nearest(self, x: float, y: float) -> TrackPoint:
        """The nearest tape centreline point: robust global search over every segment."""
        p = np.array([x, y])
        rel = p - self._seg_a
        t = np.clip(np.einsum('ij,ij->i', rel, self._seg_ab) / self._seg_len2, 0.0, 1.0)
        diff = rel - t[:, None] * self._seg_ab
        d2 = np.einsum('ij,ij->i', diff, diff)
        k = int(np.argmin(d2))
        s = float((self._seg_s[k] + t[k] * self._seg_ds[k]) % self.length)
        route = BRANCHES[self._seg_route[k]]
        ab = self._seg_ab[k]
        return TrackPoint(
            s=s,
            distance=math.sqrt(float(d2[k])),
            route=route,
            lateral=self.lateral(x, y, s),
            heading=math.atan2(ab[1], ab[0]),
        )

    def distance(self, x: float, y: float) -> float:
        """Metres from (x, y) to the nearest tape centreline."""
        return self.nearest(x, y).distance

    def lateral(self, x: float, y: float, s: float) -> float:
        """Signed offset of (x, y) from the trunk at ``s``; + is left of the driving direction."""
        trunk = self._trunk_pose(s)
        return (x - trunk.x) * -math.sin(trunk.theta) + (y - trunk.y) * math.cos(trunk.theta)

    def _trunk_pose(self, s: float) -> Pose:
        """The trunk (fork midline included) at ``s``: the reference for left/right."""
        i = int(np.searchsorted(self.s, s % self.length, side='right')) - 1
        j = (i + 1) % len(self.s)
        step = (self.s[j] if j else self.length) - self.s[i]
        t = (s % self.length - self.s[i]) / step
        xy = self.points[i] + t * (self.points[j] - self.points[i])
        return Pose(float(xy[0]), float(xy[1]), float(self.headings[i]))

    def to_px(self, xy: np.ndarray) -> np.ndarray:
        """World points (..., 2) to map pixel coordinates (..., 2) as floats."""
        xy = np.asarray(xy, dtype=float)
        return (xy - self.world_from_px[:2, 2]) / np.diag(self.world_from_px)[:2]

    # --- the floor map ----------------------------------------------------------------------

    def raster(self, cue: str | None) -> np.ndarray:
        """The top-down floor map (RGB uint8, +y up) with the cue carpet in ``cue``'s colour.

        ``cue=None`` draws no carpet. Cached: one array per cue, shared, do not modify.
        """
        if cue is not None and cue not in CUES:
            raise ValueError(f'cue must be one of {CUES} or None, got {cue!r}')
        if cue not in self._rasters:
            if self._floor_img is None:
                self._floor_img = self._floor()
            img = self._floor_img.copy()
            if cue is not None:
                c = self.config
                s = np.linspace(self.cue_start, self.cue_end, 8)
                centre = np.array([self._trunk_pose(v)[:2] for v in s])
                normal = np.array([[-math.sin(p.theta), math.cos(p.theta)]
                                   for p in map(self._trunk_pose, s)])  # fmt: skip
                half = c.cue_width / 2
                outline = np.concatenate([centre + half * normal, (centre - half * normal)[::-1]])
                cv2.fillPoly(img, [self._px_int(outline)], CUE_RGB[cue], cv2.LINE_AA, shift=3)
            thickness = max(1, round(self.config.tape_width / self.config.resolution))
            for branch in BRANCHES:
                pts = self._px_int(self.routes[branch])
                cv2.polylines(img, [pts], True, TAPE_RGB, thickness, cv2.LINE_AA, shift=3)
            img.flags.writeable = False
            self._rasters[cue] = img
        return self._rasters[cue]

    def _px_int(self, xy: np.ndarray) -> np.ndarray:
        # shift=3: cv2 draws with 1/8-pixel precision.
        return np.round(self.to_px(xy) * 8).astype(np.int32).reshape(-1, 1, 2)

    def _floor(self) -> np.ndarray:
        """A wooden floor: boards along x with seams, soft blotches and grain (fixed by seed).

        Texture gives the camera something that moves with the robot (motion is visible), and
        it is the same every lap, so it says nothing about the cue.
        """
        c = self.config
        rng = np.random.default_rng(c.floor_seed)
        h, w = self.map_shape
        board_px = 0.12 / c.resolution
        rows = np.arange(h)
        board = (rows // board_px).astype(int)
        shade = rng.normal(0.0, 6.0, board.max() + 1)[board]
        shade[(rows % board_px) < max(1.0, 0.008 / c.resolution)] -= 14.0
        blotch = rng.normal(0.0, 1.0, (h // 60 + 2, w // 60 + 2)).astype(np.float32)
        blotch = cv2.resize(blotch, (w, h), interpolation=cv2.INTER_CUBIC) * 6.0
        grain = rng.normal(0.0, 3.0, (h, w)).astype(np.float32)
        lum = shade[:, None].astype(np.float32) + blotch + grain
        floor = np.asarray(FLOOR_RGB, np.float32) + lum[..., None]
        return np.clip(floor, 0, 255).astype(np.uint8)


def _headings(route: np.ndarray) -> np.ndarray:
    d = np.roll(route, -1, axis=0) - np.roll(route, 1, axis=0)
    return np.arctan2(d[:, 1], d[:, 0])


def _check_branch(branch: str) -> None:
    if branch not in BRANCHES:
        raise ValueError(f'branch must be one of {BRANCHES}, got {branch!r}')


@functools.lru_cache(maxsize=8)
def get_track(config: TrackConfig | None = None) -> Track:
    """The Track of a config, built once: data generation makes many worlds on one floor."""
    return Track(config or TrackConfig())
