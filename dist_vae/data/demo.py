"""The embedded demo dataset: a small LSUN-format LMDB made from the photographs scikit-image ships.

It is written in LSUN's own format (40-hex-digit keys, WebP values, shorter side 256 by default) so
the demo exercises exactly the path real LSUN takes: LMDB -> shards -> stream.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import lmdb
import numpy as np
from PIL import Image

from dist_vae.files import atomic_path

DEFAULT_DEMO_SIZE = 500


def _photos() -> list[np.ndarray]:
    """The colour photographs bundled in scikit-image's wheel (no download needed)."""
    from skimage import data

    loaders: list[Callable[[], np.ndarray]] = [
        data.astronaut,
        data.chelsea,
        data.coffee,
        data.rocket,
        data.hubble_deep_field,
        data.immunohistochemistry,
        data.retina,
        data.colorwheel,
        lambda: data.stereo_motorcycle()[0],
        lambda: data.stereo_motorcycle()[1],
    ]
    return [np.ascontiguousarray(load()[..., :3]) for load in loaders]


def demo_key(seed: int, index: int) -> str:
    """An LSUN-style key: 40 hex digits."""
    return hashlib.sha1(f"dist-vae-demo/{seed}/{index}".encode()).hexdigest()


def _variant(photo: np.ndarray, rng: np.random.Generator, short_side: int) -> Image.Image:
    """A random crop (40-100% of the shorter side, aspect 1 to 1.5 either way), flip and rescale."""
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(0.4, 1.0))
    aspect = rng.uniform(1.0, 1.5)
    ch, cw = (side, int(side * aspect)) if rng.random() < 0.5 else (int(side * aspect), side)
    ch, cw = min(ch, h), min(cw, w)
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = photo[top : top + ch, left : left + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    img = Image.fromarray(np.ascontiguousarray(crop))
    scale = short_side / min(ch, cw)
    return img.resize((max(short_side, round(cw * scale)), max(short_side, round(ch * scale))), Image.LANCZOS)


def build_demo_lmdb(
    path: str | Path, n: int, seed: int = 0, short_side: int = 256, quality: int = 90
) -> Path:
    """Write `n` varied WebP images into a new LMDB directory at `path` (built beside it, then renamed)."""
    if n < 1:
        raise ValueError(f"demo size must be >= 1, got {n}")
    path = Path(path)
    photos = _photos()
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        env = lmdb.open(str(tmp), map_size=max(1 << 26, n * short_side * short_side * 6))
        try:
            with env.begin(write=True) as txn:
                for i in range(n):
                    img = _variant(photos[i % len(photos)], rng, short_side)
                    buf = io.BytesIO()
                    img.save(buf, format="WEBP", quality=quality)
                    txn.put(demo_key(seed, i).encode(), buf.getvalue())
        finally:
            env.close()
    return path


def ensure_demo_lmdb(cache_dir: str | Path, n: int = DEFAULT_DEMO_SIZE, seed: int = 0) -> Path:
    """The demo LMDB for (n, seed) under `cache_dir`, built on first use."""
    path = Path(cache_dir) / f"demo-{n}-seed{seed}-lmdb"
    if not (path / "data.mdb").is_file():
        try:
            build_demo_lmdb(path, n, seed)
        except OSError:  # the parts of one output build it together: the first rename wins
            if not (path / "data.mdb").is_file():
                raise
    return path
