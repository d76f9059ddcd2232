"""make_shards.py as a user runs it, the demo LMDB, and image-folder sources."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

from dist_vae.data.demo import build_demo_lmdb
from dist_vae.data.shards import ShardSettings, build_shards
from dist_vae.data.sources import FolderSource, SourceError, sniff_format
from tests.data_fixtures import read_tars
from tests.engine_util import env, python_cmd

ROOT = Path(__file__).resolve().parents[1]


def make_shards(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "tools" / "make_shards.py"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("source", "fragments"),
    [
        ("bogus:x", ["bad --source 'bogus:x'", "lmdb:PATH", "folder:PATH", "demo[:N]"]),
        ("lmdb:", ["bad --source 'lmdb:'"]),
        ("demo:many", ["demo:many", "positive integer"]),
        ("lmdb:{tmp}/no_such_lmdb", ["no_such_lmdb", "not found", "data.mdb"]),
        ("folder:{tmp}/no_such_dir", ["no_such_dir", "not found"]),
    ],
)
def test_bad_source_is_named_with_exit_code_2(source: str, fragments: list[str], tmp_path: Path) -> None:
    source = source.format(tmp=tmp_path)
    result = make_shards("--source", source, "--out", str(tmp_path / "out"), "--resolution", "8")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_bad_numbers_are_refused(tmp_path: Path) -> None:
    result = make_shards("--source", "demo:2", "--out", str(tmp_path), "--resolution", "8", "--quality", "0")
    assert result.returncode == 2 and "quality must be in [1, 100], got 0" in result.stderr
    result = make_shards("--source", "demo:2", "--out", str(tmp_path), "--resolution", "8", "--format", "gif")
    assert result.returncode == 2 and "--format" in result.stderr and "gif" in result.stderr


def test_demo_lmdb_is_lsun_format_varied_and_deterministic(tmp_path: Path) -> None:
    path = build_demo_lmdb(tmp_path / "demo", 12, seed=3, short_side=32)
    again = build_demo_lmdb(tmp_path / "again", 12, seed=3, short_side=32)
    env_a, env_b = lmdb.open(str(path), readonly=True), lmdb.open(str(again), readonly=True)
    with env_a.begin() as ta, env_b.begin() as tb:
        items, items_again = list(ta.cursor()), list(tb.cursor())
    env_a.close()
    env_b.close()
    assert items == items_again and len(items) == 12
    arrays = []
    for key, value in items:
        assert re.fullmatch(rb"[0-9a-f]{40}", key)
        assert sniff_format(value) == "webp"
        image = Image.open(io.BytesIO(value))
        assert min(image.size) == 32 and max(image.size) <= 48
        arrays.append(np.asarray(image.resize((32, 32))).astype(float))
    distances = [np.abs(a - b).mean() for i, a in enumerate(arrays) for b in arrays[i + 1 :]]
    assert min(distances) > 2.0  # no two demo images alike


def test_demo_source_goes_through_the_lmdb_path(tmp_path: Path) -> None:
    result = make_shards("--source", "demo:12", "--out", str(tmp_path / "out"), "--resolution", "16")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / ".cache" / "demo-12-seed0-lmdb" / "data.mdb").is_file()
    assert list((tmp_path / "out" / ".cache").glob("lmdb-keys-*.txt"))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"] == "demo:12" and manifest["skipped"]["count"] == 0
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 12


def test_folder_source_is_recursive_and_sniffs_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "src" / "a" / "b").mkdir(parents=True)
    for i, rel in enumerate(["x.png", "a/y.jpg", "a/b/z.webp"]):
        Image.fromarray(rng.integers(0, 256, size=(20 + i, 30, 3), dtype=np.uint8)).save(
            tmp_path / "src" / rel,
            format="PNG",  # PNG bytes whatever the suffix: the bytes decide
        )
    (tmp_path / "src" / "a" / "broken.png").write_bytes(b"GIF89a not really")
    (tmp_path / "src" / "notes.txt").write_text("not an image")
    assert FolderSource(tmp_path / "src").keys() == ["a/b/z.webp", "a/broken.png", "a/y.jpg", "x.png"]
    settings = ShardSettings(source=f"folder:{tmp_path / 'src'}", resolution=8, val_fraction=0.0)
    manifest = build_shards(settings, tmp_path / "out", progress=False)
    keys = {
        json.loads(data)["key"]
        for members in read_tars(tmp_path / "out").values()
        for name, data in members.items()
        if name.endswith(".json")
    }
    assert keys == {"a/b/z.webp", "a/y.jpg", "x.png"}
    assert [s["key"] for s in manifest["skipped"]["items"]] == ["a/broken.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="empty holds no image files"):
        FolderSource(tmp_path / "empty").keys()


@pytest.mark.slow
def test_training_runs_with_an_empty_val_split(tmp_path: Path) -> None:
    """demo:200 with the default --val-fraction 0.01 has no val image; train anyway."""
    made = make_shards("--source", "demo:200", "--out", str(tmp_path / "s"), "--resolution", "32")
    assert made.returncode == 0, made.stderr
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["splits"]["val"]["count"] == 0
    cmd = python_cmd(tmp_path / "run", tmp_path / "s", "train.steps=4", "train.eval_every=2")
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("split 'val' of") == 1 and "validation is off" in result.stderr
