"""Real datasets written by the data tests: LSUN-style LMDBs and image folders."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import lmdb
import numpy as np
from PIL import Image

PIL_FORMATS = {"webp": "WEBP", "jpeg": "JPEG", "png": "PNG"}
ROOT = Path(__file__).resolve().parent.parent


def make_demo_shards(out: Path, images: int, resolution: int, val_fraction: float, *extra: str) -> Path:
    """`out` filled with shards of the embedded demo set, built through the real CLI."""
    cmd = [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--source", f"demo:{images}",
           "--out", str(out), "--resolution", str(resolution), "--val-fraction", str(val_fraction),
           "--workers", "1", "--no-progress", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"make_shards failed:\n{proc.stderr[-3000:]}"
    return out


def lsun_key(i: int) -> str:
    return hashlib.sha1(f"test-{i}".encode()).hexdigest()


def encode(array: np.ndarray, fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(array)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(buf, format=PIL_FORMATS[fmt], **({"quality": 95} if fmt != "png" else {}))
    return buf.getvalue()


def banded(short: int, landscape: bool) -> np.ndarray:
    """Red | green | blue bands of 2:1:2 along the long side: a centre crop is pure green."""
    bands = [(230, 20, 20)] * 2 + [(20, 230, 20)] + [(20, 20, 230)] * 2
    strip = np.repeat(np.array(bands, dtype=np.uint8), short, axis=0)  # [5*short, 3]
    image = np.repeat(strip[None], short, axis=0)  # [short, 5*short, 3]
    return image if landscape else image.transpose(1, 0, 2).copy()


def write_lmdb(path: Path, items: dict[str, bytes]) -> Path:
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for key, value in items.items():
            txn.put(key.encode(), value)
    env.close()
    return path


def mixed_items(seed: int = 0) -> tuple[dict[str, bytes], set[str], set[str]]:
    """WebP, JPEG and PNG values (banded and noise, RGB/RGBA/P) plus 3 corrupt ones.

    Returns (items, keys of banded images, keys of corrupt values).
    """
    rng = np.random.default_rng(seed)
    items: dict[str, bytes] = {}
    banded_keys: set[str] = set()
    i = 0
    for fmt in ("webp", "jpeg", "png"):
        for landscape in (True, False):
            items[lsun_key(i)] = encode(banded(48, landscape), fmt)
            banded_keys.add(lsun_key(i))
            i += 1
        for mode in ("RGB", "RGBA", "P"):
            if fmt == "jpeg" and mode != "RGB":
                continue
            h, w = rng.integers(20, 60, size=2)
            noise = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            items[lsun_key(i)] = encode(noise, fmt, mode)
            i += 1
    good_jpeg = encode(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8), "jpeg")
    corrupt = {
        lsun_key(100): b"this is not an image at all",
        lsun_key(101): good_jpeg[: len(good_jpeg) // 2],
        lsun_key(102): b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, size=200, dtype=np.uint8)),
    }
    items.update(corrupt)
    return items, banded_keys, set(corrupt)


def read_tars(directory: Path) -> dict[str, dict[str, bytes]]:
    """{tar name: {member name: bytes}} for every shard in a directory."""
    shards = {}
    for path in sorted(directory.glob("*.tar")):
        with tarfile.open(path) as tar:
            shards[path.name] = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
    return shards


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `directory`: (content, mtime_ns)."""
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def id_images(folder: Path, n: int, size: int = 8) -> None:
    """PNGs whose top row carries the image id (red channel) and whose other rows rise left to right.

    The id survives a horizontal flip; the ramp shows whether one happened.
    """
    ramp = np.linspace(0, 255, size).astype(np.uint8)
    for i in range(n):
        image = np.zeros((size, size, 3), dtype=np.uint8)
        image[0, :, 0] = i
        image[1:, :, 1] = ramp
        sub = folder / f"class{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(sub / f"img{i:03d}.png")
