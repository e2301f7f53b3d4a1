"""rosbag2 on disk with ``rosbags`` only: reading, the one writer, replay planning and scoring."""
