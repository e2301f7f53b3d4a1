"""The robot's camera: a forward-tilted pinhole over a flat floor, rendered by one homography.

A flat floor seen through a pinhole is a plane-to-plane map, so a frame is one
``cv2.warpPerspective`` of the top-down map (about 0.1 ms at 120x160), then lighting and noise.
The camera is tilted so that the top row still looks at the floor (no horizon, no sky to draw);
with the defaults it sees from about 0.17 m to 1.1 m ahead of the robot's centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np

from malpi_ros.checks import int_at_least, non_negative, positive
from malpi_ros.errors import ConfigError
from malpi_ros.sim.robot import Pose
from malpi_ros.sim.track import FLOOR_RGB, Track


@dataclass(frozen=True)
class CameraConfig:
    """Image size, intrinsics (horizontal field of view), mount pose, lighting and noise.

    Defaults: a Raspberry Pi camera v2 (62.2 deg wide) 0.2 m above the floor, 5 cm ahead of the
    robot's centre, tilted 35 deg down. Per lap the light changes (``gain_jitter``: overall
    gain in [1-j, 1+j]; ``tint_jitter``: per-channel gain; ``bias_jitter``: offset in grey
    levels); per frame it flickers (``flicker``: gain std) and pixels get Gaussian noise
    (``noise_std`` grey levels).
    """

    width: int = 160
    height: int = 120
    hfov_deg: float = 62.2
    mount_height: float = 0.2
    mount_forward: float = 0.05
    tilt_deg: float = 35.0
    noise_std: float = 3.0
    gain_jitter: float = 0.15
    tint_jitter: float = 0.04
    bias_jitter: float = 12.0
    flicker: float = 0.02

    def __post_init__(self) -> None:
        int_at_least('camera width', self.width, 8)
        int_at_least('camera height', self.height, 8)
        if not (isinstance(self.hfov_deg, int | float) and 10.0 <= self.hfov_deg <= 150.0):
            raise ConfigError(f'camera hfov_deg must be in [10, 150], got {self.hfov_deg!r}')
        positive('camera mount_height', self.mount_height)
        if not (isinstance(self.mount_forward, int | float) and math.isfinite(self.mount_forward)):
            raise ConfigError(f'camera mount_forward must be finite, got {self.mount_forward!r}')
        if not (isinstance(self.tilt_deg, int | float) and 0.0 < self.tilt_deg < 90.0):
            raise ConfigError(f'camera tilt_deg must be in (0, 90), got {self.tilt_deg!r}')
        # The top image row must look at the floor: the renderer draws no horizon or sky.
        if self.tilt_deg - self.vfov_deg / 2 < 2.0:
            raise ConfigError(
                f'camera tilt_deg ({self.tilt_deg}) must exceed half the vertical field of view '
                f'({self.vfov_deg / 2:.1f} deg for a {self.height}x{self.width} image at '
                f'hfov {self.hfov_deg}) by 2 deg, so that the whole image sees the floor'
            )
        for name in ('noise_std', 'bias_jitter', 'tint_jitter', 'flicker'):
            non_negative(f'camera {name}', getattr(self, name))
        for name in ('gain_jitter', 'tint_jitter', 'flicker'):
            if getattr(self, name) >= 0.5:
                raise ConfigError(f'camera {name} must be < 0.5, got {getattr(self, name)!r}')

    @property
    def focal(self) -> float:
        """Focal length in pixels (square pixels)."""
        return (self.width / 2) / math.tan(math.radians(self.hfov_deg) / 2)

    @property
    def vfov_deg(self) -> float:
        return math.degrees(2 * math.atan((self.height / 2) / self.focal))

    @property
    def intrinsics(self) -> np.ndarray:
        f = self.focal
        return np.array([[f, 0, (self.width - 1) / 2], [0, f, (self.height - 1) / 2], [0, 0, 1]])


class Lighting(NamedTuple):
    """One lap's light: per-channel gain and an offset in grey levels."""

    gains: tuple[float, float, float] = (1.0, 1.0, 1.0)
    bias: float = 0.0


NEUTRAL_LIGHT = Lighting()


def draw_lighting(config: CameraConfig, rng: np.random.Generator) -> Lighting:
    """A random light for a lap (its own generator: independent of the cue)."""
    gain = 1.0 + rng.uniform(-config.gain_jitter, config.gain_jitter)
    tint = 1.0 + rng.uniform(-config.tint_jitter, config.tint_jitter, size=3)
    bias = rng.uniform(-config.bias_jitter, config.bias_jitter)
    return Lighting(tuple(float(gain * t) for t in tint), float(bias))  # type: ignore[arg-type]


class Camera:
    """Renders what the robot's camera sees of a track at a pose."""

    def __init__(self, config: CameraConfig, track: Track) -> None:
        self.config = config
        self.track = track
        self._size = (config.width, config.height)
        self._floor_rgb = tuple(float(v) for v in FLOOR_RGB)

    def floor_to_image(self, pose: Pose) -> np.ndarray:
        """Homography from floor points (x, y, 1) in metres to image pixels (u, v, 1)."""
        c = self.config
        x, y, theta = pose
        tilt = math.radians(c.tilt_deg)
        forward = np.array([math.cos(theta), math.sin(theta), 0.0])
        left = np.array([-math.sin(theta), math.cos(theta), 0.0])
        up = np.array([0.0, 0.0, 1.0])
        z_cam = math.cos(tilt) * forward - math.sin(tilt) * up  # optical axis
        x_cam = -left  # image u grows to the robot's right
        y_cam = np.cross(z_cam, x_cam)  # image v grows downwards
        rot = np.stack([x_cam, y_cam, z_cam])  # world -> camera
        centre = np.array([x, y, 0.0]) + c.mount_forward * forward + c.mount_height * up
        extrinsic = np.column_stack([rot[:, 0], rot[:, 1], -rot @ centre])
        return c.intrinsics @ extrinsic

    def project(self, pose: Pose, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image coordinates of floor points (N, 2) and whether each falls inside the image."""
        xy = np.atleast_2d(np.asarray(xy, dtype=float))
        h = self.floor_to_image(pose) @ np.column_stack([xy, np.ones(len(xy))]).T
        depth = h[2]
        uv = (h[:2] / np.where(np.abs(depth) < 1e-12, 1e-12, depth)).T
        c = self.config
        inside = (
            (depth > 0)
            & (uv[:, 0] >= -0.5)
            & (uv[:, 0] <= c.width - 0.5)
            & (uv[:, 1] >= -0.5)
            & (uv[:, 1] <= c.height - 0.5)
        )
        return uv, inside

    def render_clean(self, pose: Pose, cue: str | None) -> np.ndarray:
        """The frame with neutral light and no noise (RGB uint8, height x width x 3)."""
        h = self.floor_to_image(pose) @ self.track.world_from_px
        return cv2.warpPerspective(
            self.track.raster(cue),
            h,
            self._size,
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=self._floor_rgb,
        )

    def render(
        self,
        pose: Pose,
        cue: str | None,
        lighting: Lighting = NEUTRAL_LIGHT,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """The frame under ``lighting``, with flicker and noise drawn from ``rng`` (if given)."""
        img = self.render_clean(pose, cue)
        c = self.config
        gains = np.asarray(lighting.gains, np.float32)
        if rng is not None and c.flicker > 0:
            gains = gains * np.float32(1.0 + rng.normal(0.0, c.flicker))
        out = img.astype(np.float32)
        out *= gains
        out += np.float32(lighting.bias + 0.5)  # + 0.5: round, not truncate, below
        if rng is not None and c.noise_std > 0:
            out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(c.noise_std)
        np.clip(out, 0.0, 255.0, out=out)
        return out.astype(np.uint8)
