"""pip install for machines that only train or evaluate (no ROS, no generated messages).

On a robot the package is built by colcon from CMakeLists.txt (README "On the robot"). Here,
`pip install .` gives the ROS-free core and the `malpi-ros` CLI; the *_node modules and the
`record`/`play` verbs need ROS 2 and are not usable from this install.
"""

from setuptools import find_packages, setup

setup(
    name='malpi_ros',
    version='0.1.0',
    description='Train a conv+LSTM driving policy from rosbag2 recordings and run it per frame.',
    license='MIT',
    python_requires='>=3.10',
    packages=find_packages(include=['malpi_ros', 'malpi_ros.*']),
    install_requires=[
        'numpy>=1.24',
        'opencv-python-headless>=4.8',
        'rosbags>=0.10',
        'mcap>=1.1',
        'ai-edge-litert>=2.0',
        'pyyaml>=6',
    ],
    extras_require={
        'train': ['tensorflow>=2.21', 'matplotlib>=3.7'],
        'dev': ['pytest', 'pytest-timeout', 'hypothesis', 'ruff', 'psutil'],
    },
    entry_points={'console_scripts': ['malpi-ros = malpi_ros.cli:main']},
)
