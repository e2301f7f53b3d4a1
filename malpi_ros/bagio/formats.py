"""What every bag of ours is written with: the storages and the message definitions.

One table and one typestore for the recorder node, the simulator's expert recorder, the split
writer's recovery and the tests' bag factory, so a new storage or ROS release is one edit.
"""

from __future__ import annotations

from typing import Any

from rosbags.rosbag2 import StoragePlugin
from rosbags.typesys import Stores, get_typestore

from malpi_ros.errors import ConfigError

STORAGES = {'mcap': StoragePlugin.MCAP, 'sqlite3': StoragePlugin.SQLITE3}


def check_storage(storage: str) -> StoragePlugin:
    """The rosbags plugin of a storage name; ConfigError naming the choices otherwise."""
    if storage not in STORAGES:
        raise ConfigError(f'storage must be one of {", ".join(STORAGES)}, got {storage!r}')
    return STORAGES[storage]


def typestore() -> Any:
    """A new typestore of the ROS release this package targets (Kilted, else the latest rosbags
    knows). New on each call: a writer may register more types into its own."""
    return get_typestore(getattr(Stores, 'ROS2_KILTED', Stores.LATEST))
