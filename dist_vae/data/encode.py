"""A source image -> the square, encoded image a shard stores (decode.py reads it back).

Sources hold images of any size and several formats; a shard holds one format at one resolution, so
the stream needs no resizing when it reads at the shards' resolution.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from dist_vae.data.sources import SkipImage, sniff_format

BACKGROUND = (255, 255, 255)  # under transparency: what a viewer on a white page shows
MAX_PIXELS = 100_000_000  # larger sources are skipped (make_shards --max-pixels): ~300 MB as RGB
FRAME = 0  # the frame of an animated image that is stored: the first, a still viewer's choice
ANIMATED = {"GIF", "PNG", "WEBP", "FLI", "AVIF"}  # formats whose frames are an animation
RESIZE_RULE = (
    "every format Pillow decodes; animated and multi-frame images: frame 0 (the first), counted in "
    "notes; images above max_pixels skipped before decoding; EXIF orientation applied; an embedded ICC "
    "profile converted to sRGB (Pillow ImageCms, perceptual intent; one that cannot be used ignored, "
    "with a note), CMYK without one by Pillow's CMYK->RGB, LAB by the CIE D50 profile; 16-bit "
    "greyscale scaled to 8 bits (v*255/65535, rounded), and 32-bit integer greyscale (mode I) likewise, "
    "by 65535 when every value fits 16 bits, else by 2**31-1, negatives as 0; 32-bit float greyscale "
    "(mode F) scaled by 255 when every value is within [0, 1], else clipped to [0, 255], NaN as 0; "
    f"transparency composited on white {BACKGROUND}; images whose shorter side is below min_size "
    "skipped; shorter side to resolution (PIL Lanczos, antialiased), centre crop, RGB"
)
_SRGB = ImageCms.createProfile("sRGB")


def _integer_grey_to_8_bits(img: Image.Image) -> Image.Image:
    """16- or 32-bit integer greys as 8-bit L, v*255/top rounded: top is 65535 when every value fits
    16 bits (a 16-bit PNG or TIFF, also when Pillow holds it as 32-bit mode I), else 2**31-1, the top
    of mode I's signed range; negative values show as black."""
    wide = np.asarray(img).astype(np.int64).clip(min=0)
    top = 65535 if wide.max(initial=0) <= 65535 else 2**31 - 1
    return Image.fromarray(((wide * 255 + top // 2) // top).astype(np.uint8), "L")


def _float_grey_to_8_bits(img: Image.Image) -> Image.Image:
    """Mode F as 8-bit L: 0..1 data (most float TIFFs) scaled by 255, anything else clipped to 0..255."""
    values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 255.0
    return Image.fromarray(values.clip(0, 255).round().astype(np.uint8), "L")


_SPACES = {"RGB": "RGB ", "L": "GRAY", "CMYK": "CMYK", "LAB": "Lab "}  # base mode -> ICC colour space


def _to_srgb(img: Image.Image, icc: bytes | None, notes: list[tuple[str, str]]) -> Image.Image:
    """The pixels in sRGB: the embedded profile (LAB: CIE D50 when none) applied by littleCMS, alpha
    kept aside; a profile that cannot be used is ignored with a note, as browsers do."""
    if not icc and img.mode != "LAB":
        return img
    alpha = img.convert("RGBA").getchannel("A") if img.has_transparency_data else None
    if img.mode in ("1", "LA", "La"):
        img = img.convert("L")
    elif img.mode not in _SPACES:  # P, PA, RGBA, RGBX, YCbCr, ...: their colours are the profile's RGB
        img = img.convert("RGB")
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc) if icc else ImageCms.createProfile("LAB"))
        space = source.profile.xcolor_space
        if space != _SPACES[img.mode]:
            raise ValueError(f"a {space.strip()} profile on {img.mode} pixels")
        out = ImageCms.profileToProfile(img, source, _SRGB, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as exc:
        notes.append(("colour profile ignored", _detail(exc)))
        out = img.convert("RGB") if img.mode != "LAB" else img
    if alpha is not None:
        out = out.convert("RGBA")
        out.putalpha(alpha)
    return out


def _as_shown(img: Image.Image, notes: list[tuple[str, str]]) -> Image.Image:
    """The picture a viewer shows, as 8-bit sRGB: upright, colour-managed, full-range greys, no
    hidden pixels (RESIZE_RULE states each step)."""
    icc = img.info.get("icc_profile")
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16") or img.mode == "I":
        img = _integer_grey_to_8_bits(img)
    elif img.mode == "F":
        img = _float_grey_to_8_bits(img)
    img = _to_srgb(img, icc, notes)
    if img.has_transparency_data:
        img = Image.alpha_composite(Image.new("RGBA", img.size, (*BACKGROUND, 255)), img.convert("RGBA"))
    return img.convert("RGB")


def _detail(exc: BaseException) -> str:
    """Messages may quote object addresses, which would make the manifest differ run to run."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(exc).__name__}: {exc}")


def decode_source(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, list[tuple[str, str]]]:
    """(the picture as shown, notes): notes are (kind, detail) pairs for the manifest, such as an
    animated image's frame count or a warning Pillow gave (never printed: caught here)."""
    notes: list[tuple[str, str]] = []
    Image.MAX_IMAGE_PIXELS = None  # max_pixels below replaces Pillow's bomb check (and its raw warning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as exc:
            if (known := sniff_format(data)) is not None:  # a damaged file of a known format
                raise SkipImage("undecodable", f"{known} signature, but {_detail(exc)}") from exc
            raise SkipImage(
                "unknown format", f"no Pillow decoder knows it; first bytes {data[:12].hex() or 'none'}"
            ) from exc
        except Exception as exc:  # PIL raises many unrelated types for damaged data
            raise SkipImage("undecodable", _detail(exc)) from exc
        with img:
            w, h = img.size
            if w * h > max_pixels:
                raise SkipImage("too large", f"{w}x{h} = {w * h} pixels, above max_pixels {max_pixels}")
            try:
                frames = getattr(img, "n_frames", 1)
                if frames > 1:  # animations; also TIFF pages and MPO's second pictures (depth maps)
                    img.seek(FRAME)
                    kind = "animated" if img.format in ANIMATED else "multi-frame"
                    notes.append((kind, f"{frames} frames, frame {FRAME} stored"))
                img.load()
                img = _as_shown(img, notes)
            except SkipImage:
                raise
            except Exception as exc:  # PIL raises many unrelated types for damaged data
                raise SkipImage("undecodable", _detail(exc)) from exc
    for warning in caught:
        notes.append(("warning", f"{warning.category.__name__}: {warning.message}"))
    return img, notes


def square_image(
    data: bytes, resolution: int, min_size: int, max_pixels: int = MAX_PIXELS
) -> tuple[Image.Image, list[tuple[str, str]]]:
    """Decode as shown (`decode_source`), skip if its shorter side is below `min_size` (upscaling it
    would make a flat tile), resize the shorter side to `resolution` with antialiasing, centre crop.
    Returns the square image and the notes of `decode_source`."""
    img, notes = decode_source(data, max_pixels)
    w, h = img.size
    if min(w, h) < min_size:
        raise SkipImage("too small", f"{w}x{h}: shorter side below min_size {min_size}")
    return square_crop(img, resolution), notes


def square_crop(img: Image.Image, resolution: int) -> Image.Image:
    """The shards' resize rule: the shorter side to `resolution` (Lanczos), then a centre crop."""
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
