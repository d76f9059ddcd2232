"""Sharding: a real LMDB with WebP/JPEG/PNG and corrupt values -> real tar shards + manifest."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dist_vae.data.shards import ShardSettings, build_shards
from dist_vae.data.sources import LmdbSource, sniff_format
from tests.data_fixtures import lsun_key, mixed_items, read_tars, snapshot, write_lmdb

ROOT = Path(__file__).resolve().parents[1]
RES = 16


@pytest.fixture(scope="module")
def mixed_lmdb(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes], set[str], set[str]]:
    items, banded_keys, corrupt = mixed_items()
    path = write_lmdb(tmp_path_factory.mktemp("lsun") / "mixed_lmdb", items)
    return path, items, banded_keys, corrupt


def settings_for(path: Path, **kw: object) -> ShardSettings:
    base: dict = {
        "source": f"lmdb:{path}",
        "resolution": RES,
        "format": "png",
        "shard_size": 4,
        "val_fraction": 0.3,
    }
    return ShardSettings(**{**base, **kw})


def test_sources_sniff_formats_and_cache_keys_under_the_output(mixed_lmdb, tmp_path: Path) -> None:
    path, items, _, _ = mixed_lmdb
    formats = Counter(sniff_format(v) for v in items.values())
    assert formats == {"webp": 5, "jpeg": 4, "png": 6, None: 1}  # damaged JPEG and PNG still sniff as such
    source = LmdbSource(path, tmp_path / "cache")
    assert dict(iter(source)) == items
    assert list(source) == sorted(items.items())
    assert [p.name.startswith("lmdb-keys-") for p in (tmp_path / "cache").iterdir()] == [True]
    assert not Path("lmdb-keys").exists() and not list(Path.cwd().glob("lmdb-keys-*"))


def test_every_valid_image_once_at_the_right_size_and_crop(mixed_lmdb, tmp_path: Path) -> None:
    path, items, banded_keys, corrupt = mixed_lmdb
    manifest = build_shards(settings_for(path), tmp_path / "out", workers=2, progress=False)
    shards = read_tars(tmp_path / "out")
    seen: Counter[str] = Counter()
    for tar_name, members in shards.items():
        split = tar_name.split("-")[0]
        stems = {name.rsplit(".", 1)[0] for name in members}
        assert set(members) == {f"{s}.{ext}" for s in stems for ext in ("png", "json")}
        for stem in stems:
            key = json.loads(members[f"{stem}.json"])["key"]
            seen[key] += 1
            head = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
            assert (split == "val") == (head < 0.3), key
            image = Image.open(io.BytesIO(members[f"{stem}.png"]))
            assert (image.size, image.mode) == ((RES, RES), "RGB")
            if key in banded_keys:  # centre crop of red|green|blue bands: the centre is green
                centre = np.asarray(image)[6:10, 6:10].astype(int)
                assert np.abs(centre - [20, 230, 20]).max() < 40, (key, centre[0, 0])
    assert seen == Counter(set(items) - corrupt)

    assert manifest == json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"]["count"] == 3
    assert {s["key"] for s in manifest["skipped"]["items"]} == corrupt
    assert manifest["skipped"]["reasons"] == {"undecodable": 2, "unknown format": 1}
    assert manifest["resolution"] == RES and manifest["format"] == "png"
    total = 0
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            data = (tmp_path / "out" / shard["name"]).read_bytes()
            assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
            assert shard["count"] == len(shards[shard["name"]]) // 2
        total += manifest["splits"][split]["count"]
    assert total == len(items) - 3
    assert manifest["splits"]["val"]["count"] > 0 and manifest["splits"]["train"]["count"] > 0


def test_rerun_is_byte_stable_and_worker_count_does_not_matter(mixed_lmdb, tmp_path: Path) -> None:
    path = mixed_lmdb[0]
    settings = settings_for(path, format="webp", quality=80)
    build_shards(settings, tmp_path / "a", workers=2, progress=False)
    before = snapshot(tmp_path / "a")
    time.sleep(0.01)
    build_shards(settings, tmp_path / "a", workers=2, progress=False)
    assert snapshot(tmp_path / "a") == before
    headers = set()
    for path in (tmp_path / "a").glob("*.tar"):
        with tarfile.open(path) as tar:
            headers |= {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in tar}
    assert headers == {(0, 0, 0, "", "", 0o644)}
    build_shards(settings, tmp_path / "b", workers=1, progress=False)
    shards_a, shards_b = read_tars(tmp_path / "a"), read_tars(tmp_path / "b")
    assert shards_a == shards_b and len(shards_a) >= 4
    for name in shards_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match="already holds shards made with settings"):
        build_shards(settings_for(path, resolution=8), tmp_path / "a", progress=False)


def test_a_killed_run_is_finished_by_the_next(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    buf_items = {}
    for i in range(80):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        buf_items[lsun_key(i)] = buf.getvalue()
    lmdb_path = write_lmdb(tmp_path / "lmdb", buf_items)
    cmd = [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--source", f"lmdb:{lmdb_path}"]
    cmd += ["--resolution", "8", "--shard-size", "1", "--val-fraction", "0.2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(out)], env=env)
    deadline = time.monotonic() + 60
    while len(list((out / ".progress").glob("*.tar.json"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    assert 3 <= len(list(out.glob("*.tar"))) < 80
    other = ShardSettings(source=f"lmdb:{lmdb_path}", resolution=16, shard_size=1, val_fraction=0.2)
    with pytest.raises(ValueError, match="holds an unfinished run with settings"):
        build_shards(other, out, progress=False)

    subprocess.run([*cmd, "--out", str(out)], env=env, check=True, capture_output=True)
    subprocess.run([*cmd, "--out", str(tmp_path / "whole")], env=env, check=True, capture_output=True)
    finished, whole = snapshot(out), snapshot(tmp_path / "whole")
    assert {k: v[0] for k, v in finished.items() if not k.startswith(".cache")} == {
        k: v[0] for k, v in whole.items() if not k.startswith(".cache")
    }
    assert not (out / ".progress").exists() and not list(out.glob("*.tmp-*"))
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["count"] > 50


def test_limit_and_jpeg_output_are_readable_by_webdataset(mixed_lmdb, tmp_path: Path) -> None:
    path, items, _, corrupt = mixed_lmdb
    settings = settings_for(path, format="jpg", quality=90, limit=10, val_fraction=0.0)
    manifest = build_shards(settings, tmp_path / "out", progress=False)
    first = sorted(items)[:10]
    assert manifest["splits"]["train"]["count"] + manifest["skipped"]["count"] == 10
    assert manifest["skipped"]["count"] == len(corrupt & set(first))
    urls = [str(tmp_path / "out" / s["name"]) for s in manifest["splits"]["train"]["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert {json.loads(s["json"])["key"] for s in samples} == set(first) - corrupt
    assert all(sniff_format(s["jpg"]) == "jpeg" for s in samples)


def test_index_sidecars_locate_and_hash_every_image(mixed_lmdb, tmp_path: Path) -> None:
    manifest = build_shards(settings_for(mixed_lmdb[0]), tmp_path / "out", progress=False)
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            data = (tmp_path / "out" / shard["name"]).read_bytes()
            index_bytes = (tmp_path / "out" / shard["index"]["name"]).read_bytes()
            assert shard["index"]["name"] == shard["name"].replace(".tar", ".idx.json")
            assert shard["index"]["bytes"] == len(index_bytes)
            assert shard["index"]["sha256"] == hashlib.sha256(index_bytes).hexdigest()
            index = json.loads(index_bytes)
            assert index["shard"] == shard["name"] and len(index["samples"]) == shard["count"]
            members = read_tars(tmp_path / "out")[shard["name"]]
            for key, member, offset, size, sha in index["samples"]:
                assert data[offset : offset + size] == members[member]
                assert hashlib.sha256(members[member]).hexdigest() == sha
                assert json.loads(members[member.rsplit(".", 1)[0] + ".json"])["key"] == key


def test_output_of_an_older_make_shards_is_rebuilt_with_indexes(mixed_lmdb, tmp_path: Path) -> None:
    settings = settings_for(mixed_lmdb[0])
    manifest = build_shards(settings, tmp_path / "out", progress=False)
    tars = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.tar")}
    for path in (tmp_path / "out").glob("*.idx.json"):
        path.unlink()
    old = {**json.loads(json.dumps(manifest)), "version": 1}
    for split in old["splits"].values():
        for shard in split["shards"]:
            del shard["index"]
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(old))
    assert build_shards(settings, tmp_path / "out", progress=False) == manifest
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.tar")} == tars
    assert len(list((tmp_path / "out").glob("*.idx.json"))) == len(tars)
