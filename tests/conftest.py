"""Shared fixtures: demo shards built once per session through the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of 32 px demo shards (train + val splits, manifest.json)."""
    out = tmp_path_factory.mktemp("demo_shards")
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--source", "demo:96", "--out", str(out),
         "--resolution", "32"],
        check=True, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    return out
