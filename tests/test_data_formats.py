"""Every file Pillow can open is stored as a viewer shows it, or listed with its reason.

Real image files written with Pillow (GIF, BMP, TIFF and more, an ICC-tagged JPEG, an animated GIF,
a JPEG with damaged EXIF), sharded for real, through the CLI where the behaviour is the CLI's.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from dist_vae.data.shards import ShardSettings, build_shards
from tests.data_fixtures import read_tars

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
RES = 16


def make_shards(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--no-progress", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)


def stored_pixels(out: Path) -> dict[str, np.ndarray]:
    """{source key: stored RGB pixels} of a PNG shard directory."""
    stored = {}
    for members in read_tars(out).values():
        for name, data in members.items():
            if name.endswith(".json"):
                png = members[name.removesuffix(".json") + ".png"]
                stored[json.loads(data)["key"]] = np.asarray(Image.open(io.BytesIO(png)))
    return stored


def shard_folder(src: Path, out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict, dict]:
    """(the CLI's result, manifest, {key: pixels}) of a folder sharded as PNG at RES, nothing to val."""
    result = make_shards("--source", f"folder:{src}", "--out", str(out), "--resolution", str(RES),
                         "--format", "png", "--val-fraction", "0", "--min-size", "1", *extra)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result, json.loads((out / "manifest.json").read_text()), stored_pixels(out)


def s15(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


def adobe_rgb_profile() -> bytes:
    """An ICC v2 display profile with Adobe RGB (1998) primaries (D50-adapted) and gamma 2.2, built
    byte by byte: a wide-gamut profile like the ones cameras embed, without shipping a file."""
    gamma = b"curv" + b"\0" * 4 + struct.pack(">IH", 1, 563) + b"\0\0"  # 563/256 = 2.2
    text = b"Adobe RGB (test)\0"
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", len(text)) + text + b"\0" * 67
    desc += b"\0" * (-len(desc) % 4)

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + b"\0" * 4 + s15(x) + s15(y) + s15(z)

    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(0.6097, 0.3111, 0.0195)),
            (b"gXYZ", xyz(0.2053, 0.6257, 0.0609)), (b"bXYZ", xyz(0.1492, 0.0632, 0.7446)),
            (b"rTRC", gamma), (b"gTRC", gamma), (b"bTRC", gamma)]  # fmt: skip
    start = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags:
        table += signature + struct.pack(">II", start + len(data), len(body))
        data += body
    header = struct.pack(">I", start + len(data)) + b"none" + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ "
    header += b"\0" * 12 + b"acsp" + b"\0" * 24 + s15(0.9642) + s15(1.0) + s15(0.8249)
    return header + b"\0" * (128 - len(header)) + struct.pack(">I", len(tags)) + table + data


def test_gif_bmp_tiff_and_other_pillow_formats_are_stored_pixel_exact(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(RES, RES, 3), dtype=np.uint8)
    names = ["a.gif", "b.bmp", "c.tif", "d.tiff", "e.ppm", "f.tga", "g.pcx", "h.qoi", "i.webp", "j.png"]
    for name in names:
        img = Image.fromarray(pixels)
        if name.endswith(".gif"):
            img = img.quantize(64)  # a palette image, as GIFs are
        img.save(src / name, **({"lossless": True} if name.endswith(".webp") else {}))
    result, manifest, stored = shard_folder(src, tmp_path / "out")
    assert manifest["skipped"]["count"] == 0 and set(stored) == set(names), manifest["skipped"]
    for name in names:
        expected = np.asarray(Image.open(src / name).convert("RGB"))
        assert np.array_equal(stored[name], expected), name
    assert f"train {len(names)} images" in result.stdout


def test_an_icc_tagged_jpeg_is_stored_as_its_colour_managed_rendering(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    pixels = np.zeros((RES, RES, 3), dtype=np.uint8)
    pixels[:, : RES // 2] = (200, 40, 40)  # a saturated red in Adobe RGB: a redder red than sRGB has
    pixels[:, RES // 2 :] = (60, 170, 90)
    icc = adobe_rgb_profile()
    Image.fromarray(pixels).save(src / "wide.jpg", quality=98, icc_profile=icc)
    _, manifest, stored = shard_folder(src, tmp_path / "out")
    with Image.open(src / "wide.jpg") as jpeg:
        assert jpeg.info["icc_profile"] == icc
        raw = np.asarray(jpeg.convert("RGB")).astype(int)
        managed = ImageCms.profileToProfile(
            jpeg, ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("sRGB"), outputMode="RGB"
        )
    managed = np.asarray(managed).astype(int)
    assert np.abs(raw - managed).max() > 10  # the profile matters for these colours
    assert np.abs(stored["wide.jpg"].astype(int) - managed).max() <= 2
    assert manifest["notes"]["count"] == 0 and "ICC profile converted to sRGB" in manifest["resize"]


def test_an_animated_gif_stores_its_first_frame_and_is_counted(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    frames = [Image.new("RGB", (RES, RES), colour) for colour in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.new("RGB", (RES, RES), (9, 9, 9)).save(src / "still.gif")
    frames[2].save(src / "pages.tif", save_all=True, append_images=frames[:2])  # a 3-page scan
    result, manifest, stored = shard_folder(src, tmp_path / "out")
    assert Image.open(src / "anim.gif").n_frames == 3
    assert np.abs(stored["anim.gif"].astype(int) - (250, 0, 0)).max() <= 4  # frame 0, not 1 or 2
    assert np.abs(stored["pages.tif"].astype(int) - (0, 0, 250)).max() <= 4
    assert manifest["notes"]["kinds"] == {"animated": 1, "multi-frame": 1}
    assert manifest["notes"]["items"] == [
        {"key": "anim.gif", "note": "animated", "detail": "3 frames, frame 0 stored"},
        {"key": "pages.tif", "note": "multi-frame", "detail": "3 frames, frame 0 stored"},
    ]
    assert "frame 0 (the first)" in manifest["resize"]
    assert "notes {'animated': 1, 'multi-frame': 1}" in result.stdout


def test_max_pixels_skips_larger_images_naming_their_size(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(src / "big.png")
    Image.new("RGB", (20, 20), (1, 2, 3)).save(src / "fits.png")
    _, manifest, stored = shard_folder(src, tmp_path / "out", "--max-pixels", "1000")
    assert set(stored) == {"fits.png"}
    [item] = manifest["skipped"]["items"]
    assert item["key"] == "big.png" and item["reason"] == "too large"
    assert "40x30 = 1200 pixels" in item["detail"] and "1000" in item["detail"]
    assert manifest["settings"]["max_pixels"] == 1000
    helped = make_shards("--help")
    assert "--max-pixels" in helped.stdout and "default: 100,000,000" in helped.stdout


def test_pillow_warnings_go_to_the_manifest_not_the_terminal(tmp_path: Path) -> None:
    """A JPEG whose EXIF names a tag past its end: Pillow warns while reading the orientation."""
    src = tmp_path / "src"
    src.mkdir()
    ifd = struct.pack("<H", 1) + struct.pack("<HHII", 0x010E, 2, 100, 5000) + struct.pack("<I", 0)
    exif = b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + ifd
    Image.new("RGB", (RES, RES), (80, 90, 100)).save(src / "exif.jpg", exif=exif)
    result, manifest, stored = shard_folder(src, tmp_path / "out")
    assert "Warning" not in result.stderr and result.stderr == "", result.stderr
    assert "exif.jpg" in stored
    [note] = manifest["notes"]["items"]
    assert note["key"] == "exif.jpg" and note["note"] == "warning" and "UserWarning" in note["detail"]
    assert "notes {'warning': 1}" in result.stdout


def test_an_unreadable_file_is_listed_with_its_os_error(tmp_path: Path) -> None:
    """As root, permissions do not stop open(); reading /proc/self/mem at offset 0 fails with EIO."""
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (RES, RES), (1, 2, 3)).save(src / "good.png")
    (src / "mem.png").symlink_to("/proc/self/mem")
    (src / "folder.png").mkdir()  # a directory named like an image: not a file, so not listed
    result, manifest, stored = shard_folder(src, tmp_path / "out")
    assert "Traceback" not in result.stderr and set(stored) == {"good.png"}
    assert manifest["skipped"]["items"] == [
        {"key": "mem.png", "reason": "input/output error", "detail": "mem.png: [Errno 5] Input/output error"}
    ]
    assert not (tmp_path / "out" / ".progress").exists()


@pytest.mark.parametrize("mode", ["CMYK", "F", "LA", "P", "1", "I;16"])
def test_every_mode_is_stored_by_its_rule(tmp_path: Path, mode: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    ramp = np.tile(np.linspace(0, 1, RES), (RES, 1))
    img = {
        "CMYK": lambda: Image.fromarray((ramp[..., None] * [255, 255, 255, 0]).astype(np.uint8), "CMYK"),
        "F": lambda: Image.fromarray(ramp.astype(np.float32), "F"),
        "LA": lambda: Image.fromarray(np.stack([(ramp * 255).astype(np.uint8)] * 2, -1), "LA"),
        "P": lambda: Image.fromarray((ramp * 255).astype(np.uint8)).convert("P"),
        "1": lambda: Image.fromarray(ramp > 0.5),
        "I;16": lambda: Image.fromarray((ramp * 65535).astype(np.uint16)),
    }[mode]()
    img.save(src / "x.tif")
    _, manifest, stored = shard_folder(src, tmp_path / "out")
    assert manifest["skipped"]["count"] == 0, manifest["skipped"]
    grey = stored["x.tif"].astype(float).mean(axis=(0, 2))
    if mode == "CMYK":  # cyan+magenta+yellow ramp: white on the left, black on the right
        assert grey[0] > 240 and grey[-1] < 15
    elif mode == "LA":  # alpha = grey: composited on white, the left is white, the right the grey
        assert grey[0] > 240 and grey[-1] > 240 and grey[RES // 2] > 150
    else:  # a grey ramp, dark to light, whatever the mode holds it as
        assert grey[0] < 15 and grey[-1] > 240 and (np.diff(grey) >= 0).all(), grey


def test_a_folder_of_unusable_images_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.png", "b.gif", "c.bmp"):
        (src / name).write_bytes(b"not an image at all")
    result = make_shards("--source", f"folder:{src}", "--out", str(tmp_path / "out"), "--resolution", "8")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for fragment in ("none of the 3 source images", "'unknown format': 3", "manifest.json"):
        assert fragment in result.stderr, result.stderr
    settings = ShardSettings(source=f"folder:{src}", resolution=8)
    with pytest.raises(ValueError, match="none of the 3 source images"):  # also when it is run again
        build_shards(settings, tmp_path / "out", progress=False)
