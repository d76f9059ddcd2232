"""Shards -> batches of float images in [-1, 1] for one rank, at one global, world-size-free position.

Training: `position` counts the samples the whole run has consumed (all ranks, all epochs). The
sample sequence is epoch 0 ++ epoch 1 ++ ... (each epoch a seeded permutation of the split, see
order.py); which positions make which batch of a rank is plan.py's. So any world size W, batch size
B and worker count can resume from any saved position: no sample is dropped, none repeated within
an epoch, nothing is replayed on resume. A bad sample is replaced by a substitute chosen from the
files alone (plan.py); `skipped` counts what this rank replaced.

Evaluation (training=False): one pass over the split in manifest order, cut into near-equal
contiguous parts per rank and batches of at most B; an empty split gives `len(stream) == 0`.

The batches are made in DataLoader workers (workers.py) into shared-memory buffers (buffers.py) as
uint8, and scaled to [-1, 1] here or on `device` (decode.py).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dist_vae.compat.torch_data import check_supported
from dist_vae.data.buffers import BatchBuffers
from dist_vae.data.cache import ShardCache
from dist_vae.data.config import DataConfig
from dist_vae.data.decode import say_resized, to_unit_range
from dist_vae.data.index import PIL_FORMATS, read_manifest
from dist_vae.data.order import SampleOrder
from dist_vae.data.plan import Plan
from dist_vae.data.storage import Store, is_url
from dist_vae.data.workers import Batch, Failure, Lanes, raise_failure, worker_batches
from dist_vae.errors import DataError
from dist_vae.files import file_sha256

log = logging.getLogger(__name__)

STATE_VERSION = 2

__all__ = ["DataError", "ShardStream", "read_manifest"]


class ShardStream:
    """Batches [B,3,R,R] in [-1, 1] on `device` (default: CPU), or (batch, keys) with `with_keys`, for
    one rank; see the module doc."""

    def __init__(
        self,
        cfg: DataConfig,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        *,
        batch_size: int,
        training: bool = True,
        with_keys: bool = False,
        device: torch.device | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if cfg.num_workers:
            check_supported()
        directory: Path | str = cfg.path if is_url(cfg.path) else Path(cfg.path)
        cache = remote_cache(cfg) if is_url(cfg.path) else None
        manifest = read_manifest(directory, cache.store if cache else None)
        if split not in manifest["splits"]:
            raise DataError(f"{directory} has no split {split!r}; it has {sorted(manifest['splits'])}")
        if cfg.resolution > manifest["resolution"]:
            raise DataError(
                f"data.resolution={cfg.resolution} but the shards in {directory} are "
                f"{manifest['resolution']} px: re-shard at >= {cfg.resolution} px"
            )
        if cfg.resolution < manifest["resolution"]:
            say_resized(str(directory), manifest["resolution"], cfg.resolution)
        shards = manifest["splits"][split]["shards"]
        if cache is not None:
            cache.check(shards)
        if any("index" not in s for s in shards):
            _warn_unindexed(str(directory))
        order = SampleOrder([s["count"] for s in shards], seed, cfg.shuffle_group, shuffle=training)
        self.split, self.seed, self.training, self.with_keys = split, seed, training, with_keys
        self.device = device
        self.batch_size, self.world_size, self.num_workers = batch_size, world_size, cfg.num_workers
        self.total = order.total
        if training and self.total < world_size * batch_size:
            raise DataError(
                f"split {split!r} of {directory} has {self.total} images: too few for one global batch "
                f"of world_size {world_size} x batch_size {batch_size}"
            )
        self._plan = Plan(
            directory=directory,
            shards=shards,
            order=order,
            split=split,
            pil_format=PIL_FORMATS[manifest["format"]],
            resolution=cfg.resolution,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            training=training,
            flip=training and cfg.random_flip,
            seed=seed,
            cache=cache,
        )
        self.position = 0
        self._bad_shards: dict[str, str] = {}
        self._bad_samples = 0
        self._remote: dict[int, tuple[int, int]] = {}  # worker pid -> its object-store retries, bytes
        self.is_remote = cache is not None

    @property
    def samples_per_epoch(self) -> int:
        return self.total

    @property
    def rank_images(self) -> int:
        """Images this rank yields in an evaluation pass."""
        return self._plan.stop - self._plan.first

    @property
    def skipped(self) -> dict[str, int]:
        """Shards found bad and samples replaced by this rank so far."""
        return {"shards": len(self._bad_shards), "samples": self._bad_samples}

    @property
    def remote(self) -> dict[str, int]:
        """Object-store retries and bytes downloaded by this stream's workers so far (0 for local data)."""
        return {
            "retries": sum(r for r, _ in self._remote.values()),
            "bytes": sum(b for _, b in self._remote.values()),
        }

    def __len__(self) -> int:
        """Batches of this rank's evaluation pass (a training stream has no end)."""
        if self.training:
            raise TypeError("a training ShardStream is endless; see samples_per_epoch")
        return self._plan.batches

    def state_dict(self) -> dict[str, Any]:
        """The global position after the last batch yielded; the same on every rank."""
        return {
            "version": STATE_VERSION,
            "position": self.position,
            "seed": self.seed,
            "split": self.split,
            "total": self.total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at a saved position, whatever world size, batch size or workers saved it."""
        if not self.training:
            raise DataError("an evaluation stream (training=False) always starts its pass at the beginning")
        version = state.get("version") if isinstance(state, dict) else None
        if version != STATE_VERSION:
            raise DataError(
                f"data stream state version {version!r} is not {STATE_VERSION}: it was saved by an older "
                "dist-vae whose position depended on world size, batch size and workers and cannot be "
                "resumed here; start the run afresh (resume=never) or finish it with that version"
            )
        mine = self.state_dict()
        for key in ("seed", "split", "total"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"data stream state has {key}={state.get(key)!r} but this stream has {mine[key]!r}: "
                    "the saved position would not name the same samples"
                )
        position = state.get("position")
        if not isinstance(position, int) or position < 0:
            raise DataError(f"data stream state position {position!r}: expected an integer >= 0")
        self.position = position

    def __iter__(self) -> Iterator[Any]:
        buffers = BatchBuffers(self.num_workers)  # this iteration's: its workers refill only what it released
        lanes = Lanes(self._plan, self.position if self.training else 0, buffers)
        with worker_batches(lanes, self.num_workers) as batches:
            for item in batches:
                yield self._receive(item, buffers)

    def _receive(self, item: Batch | Failure, buffers: BatchBuffers) -> Any:
        """One worker's batch as this stream yields it; counts and logs the samples it replaced. A
        worker's failure is raised here: a StoreUnreachable (the object store failed past its retries)
        as itself, anything else as a DataError."""
        if isinstance(item, dict):
            raise_failure(item)
        images, slot, keys, bad, (pid, retries, nbytes) = item
        self._remote[pid] = (retries, nbytes)
        for name, why in bad:
            if name not in self._bad_shards:
                self._bad_shards[name] = why
                log.warning("%s: bad samples replaced by substitutes: %s", self._plan.directory / name, why)
        self._bad_samples += len(bad)
        if self.training:
            self.position += self.world_size * self.batch_size
        images = to_unit_range(images, self.device)
        buffers.release(slot)  # after the copy above: the worker may now refill it
        return (images, keys) if self.with_keys else images


def local_root(cfg: DataConfig) -> Path:
    """The local directory where files derived from the shard set are cached (the FID reference
    features): the shard directory itself, or the node-local cache of a URL's shards."""
    return remote_cache(cfg).directory if is_url(cfg.path) else Path(cfg.path)


def manifest_sha256(cfg: DataConfig) -> str:
    """The sha256 of the shard set's manifest.json, local or at a URL."""
    if is_url(cfg.path):
        return hashlib.sha256(remote_store(cfg).read("manifest.json")).hexdigest()
    return file_sha256(Path(cfg.path) / "manifest.json")


def remote_store(cfg: DataConfig) -> Store:
    """The object store at the URL `cfg.path`, retried as `cfg` says."""
    return Store(cfg.path, retries=cfg.remote_retries, deadline_s=cfg.remote_timeout_s)


def remote_cache(cfg: DataConfig) -> ShardCache:
    """The node-local cache of the shards at the URL `cfg.path`."""
    store = remote_store(cfg)
    directory = cfg.cache_dir or os.path.join(
        tempfile.gettempdir(), "dist-vae-shards", hashlib.sha256(store.url.encode()).hexdigest()[:16]
    )
    return ShardCache(store, Path(directory), cfg.cache_bytes)


@functools.cache
def _warn_unindexed(directory: str) -> None:
    """Say once per directory and process (a trainer opens a train and a val stream on the same shards,
    an evaluation one per pass) that its shards predate per-sample indexes; the cache is the memory."""
    log.warning(
        "%s: shards without per-sample indexes (made by an older make_shards): indexing them "
        "from their tar headers and checking samples by decoding only; re-run "
        "tools/make_shards.py with the same settings to add indexes",
        directory,
    )
