"""A simulated MaLPi on a taped floor loop with one fork and a colour cue (no ROS, no TF).

The demo's task: a RED carpet before the fork means take the LEFT branch, BLUE the RIGHT; at
the fork the carpet is out of view, so a policy stepped frame by frame must remember it.
``SimWorld`` ties together the track (``track``), skid-steer kinematics (``robot``), the camera
renderer (``camera``) and a pure-pursuit expert (``expert``); ``plot`` draws runs over the map.
"""

from __future__ import annotations

from malpi_ros.sim.camera import Camera, CameraConfig, Lighting, draw_lighting
from malpi_ros.sim.expert import Expert, ExpertConfig
from malpi_ros.sim.robot import (
    SIM_ACTIONS,
    Pose,
    Robot,
    RobotConfig,
    integrate,
    sim_action_table,
    twist_to_wheels,
    wheels_to_twist,
)
from malpi_ros.sim.track import (
    BRANCHES,
    CUE_BRANCH,
    CUE_RGB,
    CUES,
    HORIZONS,
    Track,
    TrackConfig,
    TrackPoint,
    get_track,
)
from malpi_ros.sim.world import ForkDecision, SimConfig, SimWorld, WorldStep

__all__ = [
    'BRANCHES',
    'CUES',
    'CUE_BRANCH',
    'CUE_RGB',
    'HORIZONS',
    'SIM_ACTIONS',
    'Camera',
    'CameraConfig',
    'Expert',
    'ExpertConfig',
    'ForkDecision',
    'Lighting',
    'Pose',
    'Robot',
    'RobotConfig',
    'SimConfig',
    'SimWorld',
    'Track',
    'TrackConfig',
    'TrackPoint',
    'WorldStep',
    'draw_lighting',
    'get_track',
    'integrate',
    'sim_action_table',
    'twist_to_wheels',
    'wheels_to_twist',
]
