"""One sample's pixels: its encoded bytes read through the shard index -> uint8 [R, R, 3], and a batch
of uint8 -> float in [-1, 1] where it is consumed.

Workers hand over uint8 pixels (a quarter of float32's bytes through shared memory, and through
the host-to-device copy when the stream is given a `device`); the main process, or the device,
scales them to [-1, 1]. (Handing them over channels-last, for the consumer to transpose while
scaling, would save a worker less time than it costs a CPU consumer.)
"""

from __future__ import annotations

import functools
import io
import logging

import numpy as np
import torch
from PIL import Image

from dist_vae.data.index import BadSample, ShardReader

log = logging.getLogger(__name__)


@functools.cache
def say_resized(directory: str, stored: int, resolution: int) -> None:
    """One line per directory and process when shards are larger than data.resolution: they are
    downscaled on load (the cache is the memory)."""
    log.warning(
        "%s: shards are %d px and data.resolution is %d: every image is resized on load (Lanczos), "
        "which costs time in the workers and resamples a resampled image; for speed and exact pixels, "
        "make shards at %d px (tools/make_shards.py --resolution %d)",
        directory, stored, resolution, resolution, resolution,
    )  # fmt: skip


def decode(data: bytes, pil_format: str, resolution: int) -> np.ndarray:
    """Encoded image -> uint8 [R, R, 3] (resized with Lanczos when the shards are larger)."""
    img = Image.open(io.BytesIO(data), formats=[pil_format])  # in memory: nothing to close
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.LANCZOS)
    return np.asarray(img)


def read_pixels(
    reader: ShardReader, shard: int, sample: int, pil_format: str, resolution: int
) -> tuple[np.ndarray, str]:
    """(pixels, key) of one sample; BadSample when it cannot be read or decoded."""
    data = reader.read(shard, sample)
    key = reader.key(shard, sample)
    try:
        return decode(data, pil_format, resolution), key
    except Exception as exc:  # PIL raises many unrelated types for damaged data
        raise BadSample(reader.shards[shard]["name"], f"{key}: undecodable ({exc})") from exc


def to_unit_range(images: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """uint8 [B,3,R,R] -> float32 in [-1, 1], on `device` (copied there as uint8: a quarter of the bytes)."""
    if device is not None:
        images = images.to(device, non_blocking=True)
    return images.float().div_(127.5).sub_(1.0)
