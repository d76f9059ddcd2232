"""Shared fixtures: demo shards built once per session through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of 32 px demo shards: 96 images, a fifth of them in val, 16 per shard."""
    out = tmp_path_factory.mktemp("demo_shards")
    cmd = [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--source", "demo:96", "--out", str(out),
           "--resolution", "32", "--val-fraction", "0.2", "--shard-size", "16", "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"make_shards failed:\n{proc.stderr[-3000:]}"
    return out
