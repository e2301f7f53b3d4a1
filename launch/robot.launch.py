"""Bring up MaLPi: camera remap, the perception-policy node and the motor driver.

    ros2 launch malpi_ros robot.launch.py bundle:=/path/to/bundle
        [backend:=litert] [camera_topic:=/camera/image_raw] [teleop_topic:=/teleop/cmd_vel]
        [params_file:=.../robot.yaml]

Thin on purpose: everything it passes is a parameter or a remap that works the same on the
command line, as the tests run it:
``policy_node --ros-args --params-file robot.yaml -p bundle:=... -p backend:=litert
-r image:=/camera/image_raw`` and ``motor_driver_node --ros-args --params-file robot.yaml
-r teleop/cmd_vel:=/teleop/cmd_vel``.
test/test_launch.py checks every name here against the nodes' declared parameters and topics.
The camera driver is not started here: run the one of your camera and point camera_topic at it.
The motor driver is respawned when it dies; see the README's "Reliability" for what remains.
"""

from __future__ import annotations

RESPAWN_DELAY = 0.5  # s before a dead motor driver is started again (it zeroes the motors)


def generate_launch_description():
    # Imported here: launch and launch_ros come with a ROS install (apt), not from PyPI, and the
    # tests read this file without them.
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument
    from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
    from launch_ros.actions import Node
    from launch_ros.substitutions import FindPackageShare

    params_file = LaunchConfiguration('params_file')
    return LaunchDescription(
        [
            DeclareLaunchArgument('bundle', description='model bundle directory (required)'),
            DeclareLaunchArgument(
                'backend', default_value='litert', description='policy runtime: litert | keras'
            ),
            DeclareLaunchArgument(
                'camera_topic',
                default_value='/camera/image_raw',
                description='sensor_msgs/Image topic of the camera (policy_node image)',
            ),
            DeclareLaunchArgument(
                'teleop_topic',
                default_value='/teleop/cmd_vel',
                description='geometry_msgs/Twist of a person (keyboard, joystick) that takes '
                'over from the policy while it keeps coming (motor_driver_node teleop/cmd_vel)',
            ),
            DeclareLaunchArgument(
                'params_file',
                default_value=PathJoinSubstitution(
                    [FindPackageShare('malpi_ros'), 'config', 'nodes', 'robot.yaml']
                ),
                description='parameters of both nodes (node_name: ros__parameters: ...)',
            ),
            Node(
                package='malpi_ros',
                executable='policy_node',
                name='policy_node',
                output='screen',
                parameters=[
                    params_file,
                    {
                        'bundle': LaunchConfiguration('bundle'),
                        'backend': LaunchConfiguration('backend'),
                    },
                ],
                remappings=[
                    ('image', LaunchConfiguration('camera_topic')),
                    # what the driver applied: ~/output flags the steps a teleop overrode
                    ('applied', '/motor_driver_node/applied'),
                ],
            ),
            Node(
                package='malpi_ros',
                executable='motor_driver_node',
                name='motor_driver_node',
                output='screen',
                parameters=[params_file],
                remappings=[('teleop/cmd_vel', LaunchConfiguration('teleop_topic'))],
                # A driver that died (kill -9, OOM, segfault) left the HAT on its last throttle;
                # the new one zeroes the motors before it subscribes cmd_vel.
                respawn=True,
                respawn_delay=RESPAWN_DELAY,
            ),
        ]
    )
