"""Sources that cannot be used are refused in one line, and the rough edges of a rebuild.

Real LMDBs (the lmdb package) cut short, replaced by other bytes or empty; real shard directories
rebuilt with other settings; a data.path that holds images or an LMDB instead of shards.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

from dist_vae.data.config import DataConfig
from dist_vae.data.index import read_manifest
from dist_vae.data.sources import check_lmdb_file
from dist_vae.data.stream import ShardStream
from dist_vae.errors import DataError
from tests.data_fixtures import lsun_key, write_lmdb

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def make_shards(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--no-progress", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)


def one_line_refusal(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)  # not -7 (SIGBUS) nor 135
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def good_lmdb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    items = {}
    for i in range(40):
        path = tmp_path_factory.mktemp("img") / "x.png"
        Image.fromarray(rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)).save(path)
        items[lsun_key(i)] = path.read_bytes()
    return write_lmdb(tmp_path_factory.mktemp("lsun") / "good_lmdb", items)


def test_a_truncated_lmdb_is_refused_with_its_size_against_the_header(
    good_lmdb: Path, tmp_path: Path
) -> None:
    full = (good_lmdb / "data.mdb").read_bytes()
    assert check_lmdb_file(good_lmdb / "data.mdb") == 40
    cut = tmp_path / "cut_lmdb"
    cut.mkdir()
    (cut / "data.mdb").write_bytes(full[: len(full) // 2])  # a partial copy
    result = make_shards("--source", f"lmdb:{cut}", "--out", str(tmp_path / "out"), "--resolution", "8")
    one_line_refusal(
        result, str(cut / "data.mdb"), "truncated", f"{len(full) // 2} bytes", f"header claims {len(full)}"
    )
    assert not (tmp_path / "out").exists()


def test_a_path_that_is_not_an_lmdb_says_so(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    result = make_shards(
        "--source", f"lmdb:{tmp_path / 'folder'}", "--out", str(tmp_path / "o"), "--resolution", "8"
    )
    one_line_refusal(result, "folder is not an LMDB", "holds no data.mdb")
    (tmp_path / "file").write_bytes(b"x" * 5000)
    result = make_shards(
        "--source", f"lmdb:{tmp_path / 'file'}", "--out", str(tmp_path / "o"), "--resolution", "8"
    )
    one_line_refusal(result, "file is not an LMDB", "a file")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.mdb").write_bytes(os.urandom(20000))
    result = make_shards(
        "--source", f"lmdb:{tmp_path / 'other'}", "--out", str(tmp_path / "o"), "--resolution", "8"
    )
    one_line_refusal(result, "data.mdb is not an LMDB file", "20000 bytes", "no LMDB header")


def test_an_empty_lmdb_is_an_error(tmp_path: Path) -> None:
    lmdb.open(str(tmp_path / "empty_lmdb"), map_size=1 << 20).close()
    result = make_shards(
        "--source", f"lmdb:{tmp_path / 'empty_lmdb'}", "--out", str(tmp_path / "o"), "--resolution", "8"
    )
    one_line_refusal(result, "empty_lmdb holds no images (0 entries)")


def test_a_refused_rebuild_names_what_differs_and_a_rebuild_leaves_no_old_shard(
    good_lmdb: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    base = ("--source", f"lmdb:{good_lmdb}", "--out", str(out), "--val-fraction", "0.2")
    assert make_shards(*base, "--resolution", "16", "--shard-size", "2").returncode == 0
    before = {p.name for p in out.glob("*.tar")}
    line = one_line_refusal(
        make_shards(*base, "--resolution", "32", "--shard-size", "2", "--format", "png"),
        "resolution: 16 -> 32",
        "format: 'webp' -> 'png'",
        "new --out",
        f"delete {out}",
    )
    assert "shard_size" not in line and "quality" not in line  # only what differs

    (out / "manifest.json").unlink()  # remade in place with other settings
    assert make_shards(*base, "--resolution", "16", "--shard-size", "8").returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {s["name"] for split in manifest["splits"].values() for s in split["shards"]}
    assert {p.name for p in out.glob("*.tar")} == listed and len(listed) < len(before)
    assert {p.name for p in out.glob("*.idx.json")} == {n.removesuffix(".tar") + ".idx.json" for n in listed}


def test_a_data_path_of_images_or_an_lmdb_names_the_make_shards_command(
    good_lmdb: Path, tmp_path: Path
) -> None:
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "sub" / "a.jpg")
    with pytest.raises(DataError) as refused:
        read_manifest(tmp_path / "photos")
    assert f"--source folder:{tmp_path / 'photos'} --out NEW_DIR" in str(refused.value)
    with pytest.raises(DataError, match=rf"--source lmdb:{good_lmdb} --out NEW_DIR"):
        read_manifest(good_lmdb)
    with pytest.raises(DataError, match=r"nowhere/manifest.json is missing.*--out"):
        read_manifest(tmp_path / "nowhere")


def test_shards_larger_than_data_resolution_are_resized_with_one_line(
    good_lmdb: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    assert (
        make_shards("--source", f"lmdb:{good_lmdb}", "--out", str(out), "--resolution", "16").returncode == 0
    )
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # a trainer opens several streams on one directory: one line for all
            stream = ShardStream(DataConfig(path=str(out), resolution=8, num_workers=0), batch_size=2)
        batch = next(iter(stream))
    assert batch.shape == (2, 3, 8, 8)
    lines = [r.getMessage() for r in caplog.records if "resized on load" in r.getMessage()]
    assert len(lines) == 1 and "shards are 16 px and data.resolution is 8" in lines[0], caplog.text
    assert "--resolution 8" in lines[0]
    shutil.rmtree(out)


def test_an_older_output_is_rebuilt_only_when_the_settings_it_had_agree(
    good_lmdb: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ("--source", f"lmdb:{good_lmdb}", "--out", str(out), "--resolution", "16", "--val-fraction", "0.2")
    assert make_shards(*args).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    older = {
        **manifest,
        "version": 3,
        "settings": {k: v for k, v in manifest["settings"].items() if k != "max_pixels"},
    }
    (out / "manifest.json").write_text(
        json.dumps({**older, "settings": {**older["settings"], "resolution": 32}})
    )
    line = one_line_refusal(make_shards(*args), "resolution: 32 -> 16")
    assert "max_pixels" not in line  # a setting the older make_shards did not have is not a difference
    (out / "manifest.json").write_text(json.dumps(older))
    again = make_shards(*args)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "manifest.json").read_text()) == manifest
