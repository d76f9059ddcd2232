"""Images a new user's folder holds that make_shards must not store wrongly or drop silently.

Each test writes real files with Pillow (real 16-bit PNGs, EXIF bytes, alpha, symlinks) and runs the
real sharding, through the CLI where the behaviour is the CLI's.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_vae.data.shards import ShardSettings, build_shards
from tests.data_fixtures import read_tars

ROOT = Path(__file__).resolve().parents[1]
RES = 16


ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def cli(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--no-progress", *args]


def make_shards(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), env=ENV, capture_output=True, text=True, timeout=120)


def shard_folder(src: Path, out: Path, **kw: object) -> tuple[dict, dict[str, np.ndarray]]:
    """(manifest, {source key: stored RGB pixels}) of a folder sharded as PNG at RES."""
    settings = ShardSettings(source=f"folder:{src}", resolution=RES, format="png", val_fraction=0.0, **kw)
    manifest = build_shards(settings, out, progress=False)
    stored = {}
    for members in read_tars(out).values():
        for name, data in members.items():
            if name.endswith(".json"):
                stem = name.removesuffix(".json")
                stored[json.loads(data)["key"]] = np.asarray(Image.open(io.BytesIO(members[f"{stem}.png"])))
    return manifest, stored


def save_noise(rng: np.random.Generator, path: Path, height: int, width: int) -> None:
    """A PNG of uniform RGB noise: an ordinary 8-bit source image."""
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(path)


def test_16_bit_png_is_scaled_to_8_bits(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (64, 1))
    (tmp_path / "src").mkdir()
    Image.fromarray(ramp).save(tmp_path / "src" / "ramp.png")
    assert Image.open(tmp_path / "src" / "ramp.png").mode == "I;16"
    _, stored = shard_folder(tmp_path / "src", tmp_path / "out")
    grey = stored["ramp.png"].astype(float)
    assert abs(grey.mean() - 127.5) < 3  # was 251: every value above 255 clipped to white
    assert grey[:, 0].mean() < 10 and grey[:, -1].mean() > 245
    assert (np.diff(grey.mean(axis=(0, 2))) >= 0).all()


@pytest.mark.parametrize("top", [65535, 2**31 - 1])
def test_32_bit_integer_tiff_is_scaled_to_8_bits_by_its_range(tmp_path: Path, top: int) -> None:
    """Mode I (32-bit signed): values within 0..65535 are 16-bit data, others span the int32 range."""
    ramp = np.tile(np.linspace(0, top, 64).round().astype(np.int64), (64, 1)).astype(np.int32)
    (tmp_path / "src").mkdir()
    Image.fromarray(ramp).save(tmp_path / "src" / "ramp.tif")
    assert Image.open(tmp_path / "src" / "ramp.tif").mode == "I"
    manifest, stored = shard_folder(tmp_path / "src", tmp_path / "out")
    assert manifest["skipped"]["count"] == 0
    grey = stored["ramp.tif"].astype(float)
    assert abs(grey.mean() - 127.5) < 3  # mode I had been clipped at 255: mean 251.6 in both cases
    assert grey[:, 0].mean() < 10 and grey[:, -1].mean() > 245
    assert (np.diff(grey.mean(axis=(0, 2))) >= 0).all()


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """Orientation 6: the camera held upright stored the picture turned; a viewer turns it clockwise."""
    pixels = np.zeros((24, 48, 3), dtype=np.uint8)
    pixels[:, :24] = (230, 20, 20)  # left half red, right half blue, as stored
    pixels[:, 24:] = (20, 20, 230)
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "src").mkdir()
    Image.fromarray(pixels).save(tmp_path / "src" / "upright.jpg", quality=95, exif=exif)
    _, stored = shard_folder(tmp_path / "src", tmp_path / "out")
    img = stored["upright.jpg"].astype(float)
    top, bottom = img[: RES // 2 - 1], img[RES // 2 + 1 :]
    assert top[..., 0].mean() > 200 and top[..., 2].mean() < 50, "stored unrotated: the top is not red"
    assert bottom[..., 2].mean() > 200 and bottom[..., 0].mean() < 50


def test_transparent_pixels_are_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((RES, RES, 4), dtype=np.uint8)
    rgba[..., :3] = (0, 200, 0)  # hidden green under the transparent half
    rgba[:, : RES // 2, 3] = 255
    rgba[:, : RES // 2, :3] = (200, 0, 0)
    (tmp_path / "src").mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "src" / "cutout.png")
    grey = np.stack([np.full((RES, RES), 50, dtype=np.uint8), rgba[..., 3]], axis=-1)
    Image.fromarray(grey, "LA").save(tmp_path / "src" / "grey.png")
    manifest, stored = shard_folder(tmp_path / "src", tmp_path / "out")
    for key, opaque in (("cutout.png", (200, 0, 0)), ("grey.png", (50, 50, 50))):
        img = stored[key].astype(int)
        assert (img[:, : RES // 2 - 1] == opaque).all()
        assert (img[:, RES // 2 + 1 :] == 255).all(), f"{key}: hidden pixels came through"
    assert "transparency composited on white" in manifest["resize"]


def test_broken_and_looping_symlinks_and_tiny_images_are_listed_as_skipped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_noise(rng, src / "good.png", 20, 30)
    Image.fromarray(np.full((1, 1, 3), 90, dtype=np.uint8)).save(src / "dot.png")
    Image.fromarray(np.full((3, 40, 3), 90, dtype=np.uint8)).save(src / "sub" / "sliver.png")
    Image.fromarray(np.full((4, 4, 3), 90, dtype=np.uint8)).save(src / "sub" / "small.png")  # = RES / 4: kept
    (src / "gone.png").symlink_to("missing.png")
    (src / "sub" / "self.jpg").symlink_to("self.jpg")
    (src / "sub" / "ping.png").symlink_to("pong.png")
    (src / "sub" / "pong.png").symlink_to("ping.png")
    (src / "link.png").symlink_to(src / "good.png")  # a working link is an image like any other
    result = make_shards("--source", f"folder:{src}", "--out", str(tmp_path / "out"), "--resolution", "16")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    reasons = {s["key"]: s["reason"] for s in manifest["skipped"]["items"]}
    assert reasons == {
        "dot.png": "too small",
        "sub/sliver.png": "too small",
        "gone.png": "broken symlink",
        "sub/self.jpg": "symlink loop",
        "sub/ping.png": "symlink loop",
        "sub/pong.png": "symlink loop",
    }
    details = {s["key"]: s["detail"] for s in manifest["skipped"]["items"]}
    assert "missing.png" in details["gone.png"] and "1x1" in details["dot.png"]
    assert manifest["settings"]["min_size"] == RES // 4
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 3
    assert "'too small': 2" in result.stdout and "'symlink loop': 3" in result.stdout

    kept = make_shards("--source", f"folder:{src}", "--out", str(tmp_path / "all"), "--resolution", str(RES),
                       "--min-size", "1")  # fmt: skip
    assert kept.returncode == 0, kept.stderr
    manifest = json.loads((tmp_path / "all" / "manifest.json").read_text())
    assert manifest["skipped"]["reasons"] == {"broken symlink": 1, "symlink loop": 3}


def test_a_changed_source_is_refused_with_what_changed(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        save_noise(rng, src / f"{i}.png", 8, 8)
    args = ("--source", f"folder:{src}", "--out", str(out), "--resolution", "8", "--shard-size", "2")
    assert make_shards(*args).returncode == 0
    manifest = (out / "manifest.json").read_bytes()
    again = make_shards(*args)
    assert again.returncode == 0 and "train 6 images" in again.stdout  # unchanged source: nothing to do

    save_noise(rng, src / "6.png", 8, 8)
    save_noise(rng, src / "7.png", 8, 8)
    (src / "0.png").unlink()
    refused = make_shards(*args)
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr
    want = [str(out), "6 source keys", "now 7", "2 added", "1 gone", "'0.png'", "new --out", "delete "]
    assert all(fragment in lines[0] for fragment in want), lines[0]
    assert (out / "manifest.json").read_bytes() == manifest

    (src / "6.png").unlink()
    (src / "7.png").unlink()
    refused = make_shards(*args)
    assert refused.returncode == 2 and "now 5" in refused.stderr and "0 added, 1 gone" in refused.stderr


def test_a_killed_run_restarted_on_a_changed_source_is_refused(tmp_path: Path) -> None:
    """Its finished shards hold keys cut from the old list: finishing it would mix two key lists."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(60):
        save_noise(rng, src / f"{i:02d}.png", 48, 64)
    args = ("--source", f"folder:{src}", "--out", str(out), "--resolution", "8", "--shard-size", "1")
    proc = subprocess.Popen(cli(*args, "--val-fraction", "0"), env=ENV)
    deadline = time.monotonic() + 60
    while len(list((out / ".progress").glob("*.tar.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    kept = (src / "07.png").read_bytes()
    (src / "07.png").unlink()
    refused = make_shards(*args, "--val-fraction", "0")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    for fragment in (str(out), "unfinished run from 60 source keys", "now 59", "restore the source"):
        assert fragment in refused.stderr, refused.stderr
    (src / "07.png").write_bytes(kept)
    finished = make_shards(*args, "--val-fraction", "0")
    assert finished.returncode == 0 and "train 60 images" in finished.stdout, finished.stderr
