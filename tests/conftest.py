"""Shared fixtures: demo shards built once per session through the real CLI; a local Slurm cluster
started once for every test module that submits jobs."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.data_fixtures import make_demo_shards
from tests.remote_fixtures import BUCKET, FaultyProxy, create_bucket, moto_server, s3_env
from tests.slurm_local import SLURM_PACKAGES, LocalSlurm, ensure_commands

# DeepSpeed builds its CPU shared-memory op on first use (about a minute of g++) into one directory per
# user, whose build file names the sources of the environment that built it: two checkouts with their
# own environments rebuild it for each other, each time. One build per environment, kept;
# the training processes the tests launch inherit it.
if sys.prefix != sys.base_prefix:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with slow tests first (a stable sort: each file's own order stays). Under `--dist
    loadfile --no-loadscope-reorder` pytest-xdist hands a worker the next whole file in this order
    whenever it is down to 2 tests, so short files fill the end and no long one starts last while
    the other worker idles (its default order, by number of tests, put the long one-test files last)."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


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


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    """moto's S3 server on 127.0.0.1 with the bucket BUCKET, one per test module; its port."""
    with moto_server() as port:
        create_bucket(port, BUCKET)
        yield port


@pytest.fixture
def proxy(server: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultyProxy]:
    """A proxy failing about 10% of the requests; the environment points the client at it."""
    p = FaultyProxy(server, rate=0.1, seed=1)
    for key, value in s3_env(p.url).items():
        monkeypatch.setenv(key, value)
    yield p
    p.close()
