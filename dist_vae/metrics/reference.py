"""Reference features: the first N images of a shard split, embedded once and cached beside the shards.

One file per (split, resolution, N, extractor sha256) under `DATA/fid-reference/`, a safetensors
file whose JSON header also names the manifest's sha256: re-made shards make it stale, and it is
rebuilt. Training and the tools share it. Every rank embeds its share and the main process writes
the gathered features atomically (`files.write_bytes_atomic`); a read-only data directory only
costs the cache (one warning). Nothing read back can run code (safetensors, no pickle).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save
from torch import distributed as dist

from dist_vae.data.stream import local_root, manifest_sha256
from dist_vae.distributed import agreed, world
from dist_vae.files import write_bytes_atomic
from dist_vae.metrics.embed import embed_generated, split_chunks
from dist_vae.metrics.inception import InceptionFeatures

log = logging.getLogger(__name__)
CACHE_DIR = "fid-reference"


@dataclass
class Reference:
    features: torch.Tensor  # [N, 2048], the split's first N images in manifest order
    embedded: int  # images this rank embedded now: 0 when the cache was read
    path: Path


def cache_path(data_path: str | Path, split: str, resolution: int, n: int, sha256: str) -> Path:
    return Path(data_path) / CACHE_DIR / f"{split}-{resolution}px-n{n}-{sha256[:16]}.safetensors"


def _read(path: Path, meta: dict[str, str]) -> torch.Tensor | None:
    """The cached features when the file exists and was made for exactly `meta`, else None."""
    try:
        with safe_open(str(path), "pt") as f:
            if f.metadata() != meta:
                return None
        return load_file(path)["features"]
    except (OSError, SafetensorError, KeyError):
        return None


def reference_features(
    data_cfg: Any,
    split: str,
    n: int,
    extractor: InceptionFeatures,
    batch: int,
    progress: Callable[[int], object] = lambda k: None,
) -> Reference:
    """Features of the first `n` images of `split` at data.resolution, from the cache or embedded."""
    path = cache_path(local_root(data_cfg), split, data_cfg.resolution, n, extractor.sha256)
    meta = {
        "split": split,
        "resolution": str(data_cfg.resolution),
        "n": str(n),
        "extractor_sha256": extractor.sha256,
        "manifest_sha256": manifest_sha256(data_cfg),
    }
    cached = _read(path, meta)
    if agreed(int(cached is not None), dist.ReduceOp.MIN):  # every rank can read it
        assert cached is not None
        return Reference(cached, 0, path)
    source = split_chunks(data_cfg, split, n, batch)
    embedded = 0

    def images(chunk: range) -> list[torch.Tensor]:
        nonlocal embedded
        got, pixels = next(source)
        assert got == chunk, f"chunk {got} read where {chunk} was expected"
        embedded += len(chunk)
        return [pixels]

    (features,) = embed_generated(extractor, n, batch, images, progress)
    if world()[0] == 0:
        try:
            write_bytes_atomic(path, save({"features": features.contiguous()}, metadata=meta))
        except OSError as exc:
            log.warning("reference features not cached at %s (%s): they will be embedded again", path, exc)
    if world()[1] > 1:
        dist.barrier()
    return Reference(features, embedded, path)
