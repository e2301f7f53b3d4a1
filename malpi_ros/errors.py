"""The package's exceptions: one base class, one subclass per boundary where input can be bad.

Boundaries translate lower-level errors with ``raise ... from err`` so the message names the
file, topic or field at fault and the cause stays attached.
"""

from __future__ import annotations


class MalpiError(Exception):
    """Base class of every error malpi_ros raises on purpose."""


class ConfigError(MalpiError, ValueError):
    """A configuration value is out of range or inconsistent; the message says what was given."""


class DecodeError(MalpiError, ValueError):
    """An image message cannot be decoded (encoding, sizes or data length are wrong)."""


class BundleError(MalpiError):
    """A model bundle is missing, truncated or inconsistent; the message names file and field."""


class BagError(MalpiError):
    """A rosbag2 recording cannot be read or lacks what is needed; names the bag and topic."""


class DatasetError(MalpiError):
    """Recordings were read but give nothing to train or evaluate on (e.g. no windows)."""


class MotorError(MalpiError):
    """The motor backend failed; the driver stops the motors when it sees one."""


class StorageError(MalpiError):
    """The disk has no room (or a write failed) for a bag, cache or bundle; names the path."""
