"""Shared fixtures: demo shards built once per session through the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.data_fixtures import make_demo_shards


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of 32 px demo shards: 96 images, a fifth of them in val, 16 per shard."""
    return make_demo_shards(tmp_path_factory.mktemp("demo_shards"), 96, 32, 0.2, "--shard-size", "16")
