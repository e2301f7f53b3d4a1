"""malpi_ros: drive a MaLPi camera robot with a conv+LSTM policy stepped once per frame.

This package is also where the build installs the generated messages (``malpi_ros.msg``), so it
imports nothing here: ``import malpi_ros`` must stay cheap and free of rclpy and TensorFlow.
"""

__version__ = '0.1.0'
