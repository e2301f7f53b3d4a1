"""The ROS glue, the only rclpy importers: the nodes, one parameter helper, one runner.

Nothing outside this folder imports it except ``commands/`` (lazily) and the executables.
"""
