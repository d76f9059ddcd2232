"""tools/make_shards.py --out s3://...: the upload equals the local build file for file, through a
store that fails about 10% of the requests, and a rerun finishes an upload cut short."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_vae.data.storage import Store
from tests.remote_fixtures import BUCKET, FaultyProxy, s3_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_make_shards_to_s3_uploads_the_local_build_and_a_rerun_finishes_it(
    server: int, proxy: FaultyProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ("--source", "demo:40", "--resolution", "16", "--val-fraction", "0.2", "--workers", "1",
            "--no-progress", "--shard-size", "8")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "tools" / "make_shards.py"), *args]
    url = f"s3://{BUCKET}/built"
    local = tmp_path / "stage"  # the local build the upload must equal, file for file
    made = [*cmd, "--out", url, "--stage", str(local)]
    proc = subprocess.run(made, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for key, value in s3_env(f"http://127.0.0.1:{server}").items():
        monkeypatch.setenv(key, value)  # checks straight at the server
    store = Store(url)
    files = sorted(p.name for p in local.iterdir() if p.is_file() and not p.name.startswith("."))
    assert "manifest.json" in files and any(n.endswith(".idx.json") for n in files), files

    def remote(name: str) -> bytes:
        return store.read(name)

    assert all(remote(n) == (local / n).read_bytes() for n in files)
    # An upload cut short (the manifest and a shard never arrived): the same command finishes it.
    for name in ("manifest.json", files[0]):
        store.delete(name)
    proc = subprocess.run(made, env={**env, **s3_env(proxy.url)}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert all(remote(n) == (local / n).read_bytes() for n in files)
