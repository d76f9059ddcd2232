"""Shared fixtures: demo shards built once per session through the real CLI; a local Slurm cluster
started once for every test module that submits jobs."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.data_fixtures import make_demo_shards
from tests.slurm_local import SLURM_PACKAGES, LocalSlurm, ensure_commands

# DeepSpeed builds its CPU shared-memory op on first use (about a minute of g++) into one directory per
# user, whose build file names the sources of the environment that built it: two checkouts with their
# own environments rebuild it for each other, each time. One build per environment, kept;
# the training processes the tests launch inherit it.
if sys.prefix != sys.base_prefix:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of 32 px demo shards: 96 images, a fifth of them in val, 16 per shard."""
    return make_demo_shards(tmp_path_factory.mktemp("demo_shards"), 96, 32, 0.2, "--shard-size", "16")


@pytest.fixture(scope="session")
def slurm() -> Iterator[LocalSlurm]:
    """Two slurmd on this host posing as two nodes (tests/slurm_local.py); skipped where Slurm cannot
    be installed."""
    missing = ensure_commands(SLURM_PACKAGES)
    if missing:
        pytest.skip(missing)
    with LocalSlurm(nodes=2) as cluster:
        yield cluster
