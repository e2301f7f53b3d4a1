"""The simulated MaLPi: sim_node, policy_node and motor_driver_node with config/nodes/sim.yaml.

    ros2 launch malpi_ros sim.launch.py bundle:=/path/to/bundle [reset_every_frame:=true]
        [supervisor:=true]

The same graph ``make demo`` (``malpi_ros.sim.demo``) starts process by process on machines
without ``ros2 launch``: same parameter file, same remaps (``REMAPS`` below; the demo's test checks
they agree). Watch it with ``ros2 topic echo /sim_node/progress``.
"""

from __future__ import annotations

# node -> [(from, to)]: relative names of each node, wired into one graph.
REMAPS = {
    'sim_node': [('wheels', '/motor_driver_node/wheels')],
    'policy_node': [('image', '/camera/image_raw'), ('applied', '/motor_driver_node/applied')],
    'motor_driver_node': [],
}


def generate_launch_description():
    # Imported here: launch and launch_ros come with a ROS install (apt), not from PyPI, and the
    # tests read this file without them.
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument
    from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
    from launch_ros.actions import Node
    from launch_ros.substitutions import FindPackageShare

    declared = [
        DeclareLaunchArgument(
            'bundle', description='model bundle directory, malpi-ros train --out (required)'
        ),
        DeclareLaunchArgument(
            'backend', default_value='litert', description='policy runtime: litert | keras'
        ),
        DeclareLaunchArgument(
            'reset_every_frame',
            default_value='false',
            description='the ablation: reset the LSTM state before every frame',
        ),
        DeclareLaunchArgument(
            'supervisor',
            default_value='false',
            description='a simulated person takes over on teleop/cmd_vel when the robot strays',
        ),
        DeclareLaunchArgument(
            'params_file',
            default_value=PathJoinSubstitution(
                [FindPackageShare('malpi_ros'), 'config', 'nodes', 'sim.yaml']
            ),
            description='parameters of the three nodes (node_name: ros__parameters: ...)',
        ),
    ]
    params = LaunchConfiguration('params_file')
    nodes = [
        Node(
            package='malpi_ros',
            executable='sim_node',
            name='sim_node',
            parameters=[params, {'supervisor': LaunchConfiguration('supervisor')}],
            remappings=REMAPS['sim_node'],
            output='screen',
        ),
        Node(
            package='malpi_ros',
            executable='policy_node',
            name='policy_node',
            parameters=[
                params,
                {
                    'bundle': LaunchConfiguration('bundle'),
                    'backend': LaunchConfiguration('backend'),
                    # launch_ros reads 'true'/'false' as a bool, as YAML would.
                    'reset_every_frame': LaunchConfiguration('reset_every_frame'),
                },
            ],
            remappings=REMAPS['policy_node'],
            output='screen',
        ),
        Node(
            package='malpi_ros',
            executable='motor_driver_node',
            name='motor_driver_node',
            parameters=[params],
            remappings=REMAPS['motor_driver_node'],
            output='screen',
        ),
    ]
    return LaunchDescription([*declared, *nodes])
