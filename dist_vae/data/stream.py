"""Shards -> batches of float images in [-1, 1] for one rank, at one global, world-size-free position.

Training: `position` counts the samples the whole run has consumed (all ranks, all epochs). The
sample sequence is epoch 0 ++ epoch 1 ++ ... (each epoch a seeded permutation of the split, see
order.py); global batch k covers positions [P, P + W*B) and rank r takes [P + r*B, P + (r+1)*B).
So any world size W, batch size B and worker count can resume from any saved position: no sample
is dropped, none repeated within an epoch. Within a rank, batch j (counted from where this
iteration started) is made by DataLoader worker j % L, which computes its positions directly and
preads each image by offset through the shard's index (index.py): nothing is replayed on resume.
Flips are drawn per (seed, epoch, sample).

A bad sample (hash mismatch, undecodable, its shard truncated, damaged or missing) is replaced by a
substitute: the first good one among hashed picks from the split, then in manifest order after the
last pick. The choice depends only on the files, so it is the same for every worker count; batch
count and sizes never change. `skipped` counts what this rank replaced.

Evaluation (training=False): one pass over the split in manifest order, cut into near-equal
contiguous parts per rank and batches of at most B; an empty split gives `len(stream) == 0`.

Workers hand over uint8 pixels (a quarter of float32's bytes through shared memory, and through
the host-to-device copy when the stream is given a `device`); the main process, or the device,
scales them to [-1, 1]. (Handing them over channels-last, for the consumer to transpose while
scaling, saved a worker 0.1 ms per 256 px image but cost a CPU consumer 0.4 ms.)

DataLoader workers die with their parent (PR_SET_PDEATHSIG) and ignore SIGTERM and SIGUSR1, which
the main process handles (it must checkpoint before anything exits). Because they ignore SIGTERM,
multiprocessing's exit hook (terminate, then join) would wait forever for the workers of an
iteration still open when the interpreter exits; `_stop_open_iterations` stops them first.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import io
import itertools
import logging
import math
import os
import signal
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_vae.config import DataConfig
from dist_vae.data.index import PIL_FORMATS, BadSample, DataError, ShardReader, read_manifest
from dist_vae.data.order import SampleOrder, mix

log = logging.getLogger(__name__)

STATE_VERSION = 2
SUBSTITUTE_PICKS = 16  # hashed picks for a bad sample's substitute before scanning in manifest order
SLOTS_PER_WORKER = 4  # the DataLoader's 2 batches in flight per worker, the one being filled, a spare
_PR_SET_PDEATHSIG = 1
_warned_legacy: set[str] = set()

__all__ = ["DataError", "ShardStream", "read_manifest"]


def decode(data: bytes, pil_format: str, resolution: int) -> np.ndarray:
    """Encoded image -> uint8 [R, R, 3] (resized with Lanczos when the shards are larger)."""
    img = Image.open(io.BytesIO(data), formats=[pil_format])  # in memory: nothing to close
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.LANCZOS)
    return np.asarray(img)


def _shared_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty uint8 tensor in shared memory from the start (as default_collate makes a worker's
    batches), which saves the copy into shared memory that sending it to the main process would make."""
    empty = torch.empty(0, dtype=torch.uint8)
    storage = empty._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return empty.new(storage).view(shape)


class _Buffers:
    """Shared-memory batch buffers that each worker refills once the main process has let go of them.

    A fresh shared-memory segment per batch cost a worker ~2.5 ms of kernel time per 16 images at
    256 px (faulting in and zeroing new pages, unmapping old ones): 6% of its time. `free` is itself
    in shared memory, made before the workers start. A slot is refilled only after the main process
    released it (having made its own float copy), and a worker that finds none of its slots free
    makes a fresh buffer rather than wait, so a slow or failed release costs speed, never data.
    """

    def __init__(self, workers: int) -> None:
        self.free = torch.ones(workers * SLOTS_PER_WORKER, dtype=torch.bool).share_memory_()
        self._mine: dict[int, torch.Tensor] = {}  # filled in each worker process

    def take(self, lane: int, shape: tuple[int, ...]) -> tuple[int, torch.Tensor]:
        """(slot, buffer) for one batch of `shape` from worker `lane`; slot -1: not reused."""
        for slot in range(lane * SLOTS_PER_WORKER, (lane + 1) * SLOTS_PER_WORKER):
            if self.free[slot]:
                buffer = self._mine.get(slot)
                if buffer is None or buffer.shape != shape:
                    buffer = self._mine[slot] = _shared_uint8(shape)
                self.free[slot] = False
                return slot, buffer
        return -1, _shared_uint8(shape)

    def release(self, slot: int) -> None:
        if slot >= 0:
            self.free[slot] = True


def to_unit_range(images: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """uint8 [B,3,R,R] -> float32 in [-1, 1], on `device` (copied there as uint8: a quarter of the bytes)."""
    if device is not None:
        images = images.to(device, non_blocking=True)
    return images.float().div_(127.5).sub_(1.0)


_open_iterations: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register
def _stop_open_iterations() -> None:
    """Shut down the workers of iterations still open at exit (see the module doc)."""
    for iteration in list(_open_iterations):
        iteration._shutdown_workers()


class _Plan:
    """Which positions make which batch of this rank, and how to turn them into pixels (picklable)."""

    def __init__(self, directory: Path, shards: list[dict[str, Any]], order: SampleOrder, **kw: Any) -> None:
        self.directory, self.shards, self.order = directory, shards, order
        self.split: str = kw["split"]
        self.pil_format: str = kw["pil_format"]
        self.resolution: int = kw["resolution"]
        self.batch_size: int = kw["batch_size"]
        self.rank: int = kw["rank"]
        self.world_size: int = kw["world_size"]
        self.training: bool = kw["training"]
        self.flip: bool = kw["flip"]
        self.seed: int = kw["seed"]
        total = order.total
        self.first, self.stop = (
            self.rank * total // self.world_size,
            (self.rank + 1) * total // self.world_size,
        )
        self.batches = math.ceil((self.stop - self.first) / self.batch_size)  # evaluation only

    def positions(self, start: int, j: int) -> range:
        """Positions of this rank's batch j of an iteration that started at `start`."""
        if self.training:
            base = start + j * self.world_size * self.batch_size + self.rank * self.batch_size
            return range(base, base + self.batch_size)
        lo = self.first + j * self.batch_size
        return range(lo, min(self.stop, lo + self.batch_size))

    def _pixels(self, reader: ShardReader, shard: int, sample: int) -> tuple[np.ndarray, str]:
        data = reader.read(shard, sample)
        key = reader.key(shard, sample)
        try:
            return decode(data, self.pil_format, self.resolution), key
        except Exception as exc:  # PIL raises many unrelated types for damaged data
            raise BadSample(self.shards[shard]["name"], f"{key}: undecodable ({exc})") from exc

    def _substitute(self, reader: ShardReader, epoch: int, position: int) -> tuple[np.ndarray, str]:
        """A good sample to stand in for the bad one at `position`: the same whichever process asks."""
        total, reasons = self.order.total, dict[str, str]()
        picks = [mix(self.seed, epoch, position, t, "substitute") % total for t in range(SUBSTITUTE_PICKS)]
        scan = (i % total for i in range(picks[-1] + 1, picks[-1] + 1 + total))
        for candidate in itertools.chain(picks, scan):
            shard, sample = self.order.in_manifest_order(candidate)
            if shard in reader.bad_shards:
                reasons.setdefault(self.shards[shard]["name"], reader.bad_shards[shard])
                continue
            try:
                return self._pixels(reader, shard, sample)
            except BadSample as exc:
                reasons.setdefault(exc.shard, exc.why)
        listed = "; ".join(f"{name}: {why}" for name, why in sorted(reasons.items())[:10])
        more = f" and {len(reasons) - 10} more shards" if len(reasons) > 10 else ""
        raise DataError(
            f"{self.directory}: no readable sample left in split {self.split!r} to replace a bad one "
            f"({listed}{more})"
        )

    def shape(self, start: int, j: int) -> tuple[int, int, int, int]:
        """Shape of batch j: uint8 [b,3,R,R]."""
        return (len(self.positions(start, j)), 3, self.resolution, self.resolution)

    def fill(
        self, out: torch.Tensor, reader: ShardReader, start: int, j: int
    ) -> tuple[list[str], list[tuple[str, str]]]:
        """Batch j's pixels into `out`; its sample keys and (shard, why) per replaced sample."""
        pixels_of = out.numpy()
        keys, bad = [], []
        for k, position in enumerate(self.positions(start, j)):
            epoch, shard, sample = (
                self.order.at(position) if self.training else (0, *self.order.in_manifest_order(position))
            )
            try:
                pixels, key = self._pixels(reader, shard, sample)
            except BadSample as exc:
                bad.append((exc.shard, exc.why))
                pixels, key = self._substitute(reader, epoch, position)
            pixels_of[k] = pixels.transpose(2, 0, 1)
            if self.flip and mix(self.seed, epoch, self.order.sample_id(shard, sample), "flip") & 1:
                out[k] = out[k].flip(2)  # numpy's copy through a negative stride took 10x longer
            keys.append(key)
        return keys, bad


class _Lanes(IterableDataset):
    """What each DataLoader worker (lane) runs: batches j = lane, lane + L, ... from `start`."""

    def __init__(self, plan: _Plan, start: int, buffers: _Buffers) -> None:
        super().__init__()
        self.plan, self.start, self.buffers = plan, start, buffers

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, list[str], list[tuple[str, str]]] | str]:
        """(pixels, buffer slot, keys, replaced) per batch; a DataError's message instead, which the
        main process raises as one clean line."""
        info = get_worker_info()
        lane, lanes = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = ShardReader(self.plan.directory, self.plan.shards)
        try:
            j = lane
            while self.plan.training or j < self.plan.batches:
                shape = self.plan.shape(self.start, j)
                if info is None:
                    slot, out = -1, torch.empty(shape, dtype=torch.uint8)
                else:
                    slot, out = self.buffers.take(lane, shape)
                try:
                    keys, bad = self.plan.fill(out, reader, self.start, j)
                except DataError as exc:
                    yield str(exc)
                    return
                yield out, slot, keys, bad
                j += lanes
        finally:
            reader.close()


def _worker_init(parent: int, worker_id: int) -> None:
    """Leave SIGTERM/SIGUSR1 to the main process and die with it (not ~5 s later by polling)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


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
        directory = Path(cfg.path)
        manifest = read_manifest(directory)
        if split not in manifest["splits"]:
            raise DataError(f"{directory} has no split {split!r}; it has {sorted(manifest['splits'])}")
        if cfg.resolution > manifest["resolution"]:
            raise DataError(
                f"data.resolution={cfg.resolution} but the shards in {directory} are "
                f"{manifest['resolution']} px: re-shard at >= {cfg.resolution} px"
            )
        shards = manifest["splits"][split]["shards"]
        if any("index" not in s for s in shards) and str(directory) not in _warned_legacy:
            _warned_legacy.add(str(directory))
            log.warning(
                "%s: shards without per-sample indexes (made by an older make_shards): indexing them "
                "from their tar headers and checking samples by decoding only; re-run "
                "tools/make_shards.py with the same settings to add indexes",
                directory,
            )
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
        self._plan = _Plan(
            directory, shards, order, split=split, pil_format=PIL_FORMATS[manifest["format"]],
            resolution=cfg.resolution, batch_size=batch_size, rank=rank, world_size=world_size,
            training=training, flip=training and cfg.random_flip, seed=seed,
        )  # fmt: skip
        self.position = 0
        self._bad_shards: dict[str, str] = {}
        self._bad_samples = 0

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
        workers = self.num_workers
        buffers = _Buffers(workers)  # this iteration's: its workers refill only what it released
        loader = DataLoader(
            _Lanes(self._plan, self.position if self.training else 0, buffers),
            batch_size=None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=functools.partial(_worker_init, os.getpid()) if workers else None,
        )
        iteration = iter(loader)
        if workers:
            _open_iterations.add(iteration)
        try:
            for item in iteration:
                yield self._receive(item, buffers)
        finally:
            if workers:  # now, not whenever a traceback that holds this frame is freed
                iteration._shutdown_workers()

    def _receive(self, item: Any, buffers: _Buffers) -> Any:
        """One worker's batch as this stream yields it; counts and logs the samples it replaced."""
        if isinstance(item, str):
            raise DataError(item)
        images, slot, keys, bad = item
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
