"""Shared fixtures. Tests run against the package installed into the venv, never the sources."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# In-process rclpy (a few tests) must stay on this machine too.
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'


@pytest.fixture
def ros_env() -> dict[str, str]:
    """A child-process environment with a ROS_DOMAIN_ID of this test's own."""
    from support import ros_env as make_env

    return make_env()
