"""One error base for everything the project refuses, with a subclass per layer.

The CLIs catch `DistVaeError` once and print its message as the one line a failure ends in; the
subclass says which layer refused (and so which exit code and README row applies).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Every exit status the trainer and the tools end with; cluster/launch.sh acts on the same numbers."""

    SUCCESS = 0
    CRASH = 1  # an uncaught error: a bug, or a collective that timed out outside a step
    REFUSED = 2  # a DistVaeError: bad config, data, checkpoint, backend, or a full or read-only disk
    REQUEUE = 3  # stopped by a signal after a checkpoint; run the same command again to resume
    DIVERGED = 4  # too many non-finite updates in a row; requeueing would repeat it
    HANG = 5  # no step boundary in time; the stacks of every thread are in RUN_DIR/hang/
    STORE_UNREACHABLE = 6  # the object store failed past its retries; checkpointed; try again later
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT): stopped as asked, the work done so far kept


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
