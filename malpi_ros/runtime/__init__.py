"""What the robot loads: image, actions, bundle, policy, LiteRT step, frame gate, motor mixing.

No rclpy and no TensorFlow here (the keras backend is imported lazily from ``learn/``).
"""
