"""One error base for everything the project refuses, with a subclass per layer.

The CLIs catch `DistVaeError` once and print its message as the one line a failure ends in; the
subclass says which layer refused (and so which exit code and README row applies).
"""

from __future__ import annotations


class DistVaeError(Exception):
    """Something the project refuses to do; the message names the file or key and what was expected."""


class ConfigError(DistVaeError, ValueError):
    """A configuration value, key or file that cannot be used; the message says which and why."""


class DataError(DistVaeError, ValueError):
    """A data source, shard, index or manifest that cannot be used as it is."""


class CheckpointError(DistVaeError, ValueError):
    """A checkpoint that cannot be written, verified or resumed from."""


class BackendError(DistVaeError, RuntimeError):
    """A distributed backend or library version the trainer cannot drive as configured."""
