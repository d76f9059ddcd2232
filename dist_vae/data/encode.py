"""A source image -> the square, encoded image a shard stores (decode.py reads it back).

Sources hold images of any size and several formats; a shard holds one format at one resolution, so
the stream needs no resizing when it reads at the shards' resolution.
"""

from __future__ import annotations

import io
import re

from PIL import Image

from dist_vae.data.sources import sniff_format

RESIZE_RULE = "shorter side to resolution (PIL Lanczos, antialiased), centre crop, RGB"


class SkipImage(Exception):
    """A value that is not a usable image: a short reason (counted in the manifest) and its detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def square_image(data: bytes, resolution: int) -> Image.Image:
    """Decode, resize the shorter side to `resolution` with antialiasing, centre crop, RGB."""
    if sniff_format(data) is None:
        raise SkipImage("unknown format", f"not WebP, JPEG or PNG; first bytes {data[:12].hex() or 'none'}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
    except Exception as exc:  # PIL raises many unrelated types for damaged data
        # Messages may quote object addresses, which would make the manifest differ run to run.
        detail = re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(exc).__name__}: {exc}")
        raise SkipImage("undecodable", detail) from exc
    w, h = img.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    img = img.resize(size, Image.LANCZOS)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "webp":
        img.save(buf, format="WEBP", quality=quality, lossless=quality == 100)
    elif fmt == "jpg":
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()
