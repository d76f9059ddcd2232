"""A source image -> the square, encoded image a shard stores (decode.py reads it back).

Sources hold images of any size and several formats; a shard holds one format at one resolution, so
the stream needs no resizing when it reads at the shards' resolution.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, ImageOps

from dist_vae.data.sources import SkipImage, sniff_format

BACKGROUND = (255, 255, 255)  # under transparency: what a viewer on a white page shows
RESIZE_RULE = (
    "EXIF orientation applied; 16-bit greyscale scaled to 8 bits (v*255/65535, rounded), and 32-bit "
    "integer greyscale (mode I) likewise, by 65535 when every value fits 16 bits, else by 2**31-1, "
    "negatives as 0; "
    f"transparency composited on white {BACKGROUND}; images whose shorter side is below min_size "
    "skipped; shorter side to resolution (PIL Lanczos, antialiased), centre crop, RGB"
)


def _integer_grey_to_8_bits(img: Image.Image) -> Image.Image:
    """16- or 32-bit integer greys as 8-bit L, v*255/top rounded: top is 65535 when every value fits
    16 bits (a 16-bit PNG or TIFF, also when Pillow holds it as 32-bit mode I), else 2**31-1, the top
    of mode I's signed range; negative values show as black."""
    wide = np.asarray(img).astype(np.int64).clip(min=0)
    top = 65535 if wide.max(initial=0) <= 65535 else 2**31 - 1
    return Image.fromarray(((wide * 255 + top // 2) // top).astype(np.uint8), "L")


def _as_shown(img: Image.Image) -> Image.Image:
    """The picture a viewer shows, as 8-bit RGB: upright, full-range greys, no hidden pixels.

    convert("RGB") alone ignores EXIF orientation, clips 16- and 32-bit values above 255 to white and keeps
    the RGB that transparent pixels hide; for an opaque 8-bit RGB image this is a plain copy.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16") or img.mode == "I":
        img = _integer_grey_to_8_bits(img)
    if img.has_transparency_data:
        img = Image.alpha_composite(Image.new("RGBA", img.size, (*BACKGROUND, 255)), img.convert("RGBA"))
    return img.convert("RGB")


def square_image(data: bytes, resolution: int, min_size: int) -> Image.Image:
    """Decode as shown (`_as_shown`), skip if its shorter side is below `min_size` (upscaling it would
    make a flat tile), resize the shorter side to `resolution` with antialiasing, centre crop."""
    if sniff_format(data) is None:
        raise SkipImage(
            "unknown format", f"not WebP, JPEG, PNG or TIFF; first bytes {data[:12].hex() or 'none'}"
        )
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = _as_shown(img)
    except Exception as exc:  # PIL raises many unrelated types for damaged data
        # Messages may quote object addresses, which would make the manifest differ run to run.
        detail = re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(exc).__name__}: {exc}")
        raise SkipImage("undecodable", detail) from exc
    w, h = img.size
    if min(w, h) < min_size:
        raise SkipImage("too small", f"{w}x{h}: shorter side below min_size {min_size}")
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
