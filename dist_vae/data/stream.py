"""Shards -> batches of float images in [-1, 1], split across ranks and DataLoader workers by plan.

Everything is computed from the manifest's per-shard counts, so every rank agrees without talking:
an epoch lays the split's shards end to end (in a seeded order when training) as one sequence of
`total` samples; rank r takes the contiguous range [r * n, (r + 1) * n) with n = batches_per_epoch *
batch_size (the remainder is dropped), so every rank yields the same number of batches whatever the
shard sizes. Evaluation (training=False) instead cuts the split, in manifest order, into
world_size * batches_per_epoch near-equal batches: nothing is dropped and the counts still match.

Within a rank, global batch g belongs to "lane" g % L (L = max(1, num_workers)) and each lane reads
its own contiguous sub-range, so DataLoader's round-robin over workers returns batches in order.
The position (epoch, batch) is all a restart needs: the lanes replay their shard reads and shuffle
buffers from the start of the epoch without decoding, and the workers are rotated so the first
worker serves the next batch.

A shard whose size, sha256 or sample count disagrees with the manifest is skipped with a warning and
counted; its lane makes up the shortfall from the shards after its range, so batch counts never change.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
import tarfile
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_vae.config import DataConfig

log = logging.getLogger(__name__)

PIL_FORMATS = {"webp": "WEBP", "png": "PNG", "jpg": "JPEG"}  # manifest format -> the one decoder to try
STATE_VERSION = 1


class DataError(ValueError):
    """A shard directory, manifest or stream state that cannot be used; the message names it."""


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The shard directory's manifest.json, checked for the fields the stream relies on."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path} is missing: build shards with tools/make_shards.py --out {directory}")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise DataError(f"{path} is not a shard manifest: expected {what}")

    need(isinstance(manifest, dict), "a JSON object")
    need(isinstance(manifest.get("resolution"), int), "an integer 'resolution'")
    need(manifest.get("format") in PIL_FORMATS, f"a 'format' among {sorted(PIL_FORMATS)}")
    need(isinstance(manifest.get("splits"), dict), "a 'splits' object")
    for split, body in manifest["splits"].items():
        need(
            isinstance(body, dict) and isinstance(body.get("shards"), list), f"a list 'splits.{split}.shards'"
        )
        for i, shard in enumerate(body["shards"]):
            fields = {"name": str, "count": int, "bytes": int, "sha256": str}
            need(
                isinstance(shard, dict) and all(isinstance(shard.get(k), t) for k, t in fields.items()),
                f"'splits.{split}.shards[{i}]' with name, count, bytes and sha256",
            )
    return manifest


def _rng(*parts: object) -> random.Random:
    """A generator seeded from `parts`, the same in every process (unlike the salted hash())."""
    return random.Random(int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big"))


class _BadShard(Exception):
    """A shard that disagrees with its manifest entry; the message says how."""


def _read_shard(path: Path, entry: dict[str, Any]) -> list[bytes]:
    """The encoded images of one shard, in order, after checking it against its manifest entry."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _BadShard(f"unreadable ({exc})") from exc
    if len(data) != entry["bytes"]:
        raise _BadShard(f"{len(data)} bytes where the manifest says {entry['bytes']} (truncated?)")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise _BadShard("sha256 differs from the manifest")
    images = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if member.isfile() and member.name.rpartition(".")[2] in PIL_FORMATS:
                    images.append(tar.extractfile(member).read())  # type: ignore[union-attr]
    except tarfile.TarError as exc:
        raise _BadShard(f"not a readable tar ({exc})") from exc
    if len(images) != entry["count"]:
        raise _BadShard(f"{len(images)} images where the manifest says {entry['count']}")
    return images


def _shuffled(items: Iterator[bytes], size: int, rng: random.Random) -> Iterator[bytes]:
    """A seeded shuffle buffer: after it fills, each new item swaps out a random held one."""
    buffer: list[bytes] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def _decode(data: bytes, pil_format: str, resolution: int, flip: bool) -> Image.Image:
    with Image.open(io.BytesIO(data), formats=[pil_format]) as img:
        img = img.convert("RGB")
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.LANCZOS)
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img


class _Plan:
    """Which samples make which batch on which rank and lane: a pure function of the manifest."""

    def __init__(
        self,
        directory: Path,
        shards: list[dict[str, Any]],
        *,
        pil_format: str,
        resolution: int,
        batch_size: int,
        rank: int,
        world_size: int,
        lanes: int,
        seed: int,
        training: bool,
        flip: bool,
        shuffle_buffer: int,
    ) -> None:
        self.directory, self.shards, self.pil_format = directory, shards, pil_format
        self.resolution, self.batch_size = resolution, batch_size
        self.rank, self.world_size, self.lanes = rank, world_size, lanes
        self.seed, self.training, self.flip, self.shuffle_buffer = seed, training, flip, shuffle_buffer
        self.total = sum(s["count"] for s in shards)
        per_round = world_size * batch_size
        self.batches_per_epoch = self.total // per_round if training else math.ceil(self.total / per_round)

    def batch_sizes(self) -> list[int]:
        """This rank's batch sizes: all full when training; eval spreads the split evenly over ranks."""
        if self.training:
            return [self.batch_size] * self.batches_per_epoch
        chunks = self.world_size * self.batches_per_epoch
        base, extra = divmod(self.total, chunks)
        first = self.rank * self.batches_per_epoch
        return [base + (c < extra) for c in range(first, first + self.batches_per_epoch)]

    def rank_start(self) -> int:
        if self.training:
            return self.rank * self.batches_per_epoch * self.batch_size
        chunks = self.world_size * self.batches_per_epoch
        base, extra = divmod(self.total, chunks)
        first = self.rank * self.batches_per_epoch
        return first * base + min(first, extra)

    def lane_of(self, epoch: int, batch: int) -> int:
        return (epoch * self.batches_per_epoch + batch) % self.lanes

    def shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.shards)))
        if self.training:
            _rng(self.seed, epoch, "shards").shuffle(order)
        return order

    def lane_range(self, epoch: int, lane: int) -> tuple[list[int], int, int]:
        """The lane's batch sizes and its [start, stop) in the epoch's sample sequence."""
        sizes = self.batch_sizes()
        start = self.rank_start()
        for j, size in enumerate(sizes):
            if self.lane_of(epoch, j) < lane:
                start += size
        mine = [size for j, size in enumerate(sizes) if self.lane_of(epoch, j) == lane]
        return mine, start, start + sum(mine)

    def _segments(self, order: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
        segments, offset = [], 0
        for index in order:
            count = self.shards[index]["count"]
            lo, hi = max(start, offset), min(stop, offset + count)
            if lo < hi:
                segments.append((index, lo - offset, hi - offset))
            offset += count
        return segments

    def _samples(self, epoch: int, start: int, stop: int, bad: list[tuple[str, str]]) -> Iterator[bytes]:
        """The range's encoded images, then (only if a bad shard left it short) the ones after it."""
        order = self.shard_order(epoch)
        fallback = self._segments(order, stop, self.total) + self._segments(order, 0, start)
        for index, lo, hi in self._segments(order, start, stop) + fallback:
            entry = self.shards[index]
            try:
                images = _read_shard(self.directory / entry["name"], entry)
            except _BadShard as exc:
                bad.append((entry["name"], str(exc)))
                continue
            yield from images[lo:hi]

    def lane_batches(
        self, lane: int, epoch: int, skip: int
    ) -> Iterator[tuple[torch.Tensor, list[tuple[str, str]]]]:
        """Lane `lane`'s batches of `epoch` ([b,3,R,R] in [-1, 1]), the first `skip` of them not decoded."""
        sizes, start, stop = self.lane_range(epoch, lane)
        bad: list[tuple[str, str]] = []
        samples = islice(self._samples(epoch, start, stop, bad), stop - start)
        if self.training and self.shuffle_buffer > 1:
            samples = _shuffled(
                samples, self.shuffle_buffer, _rng(self.seed, epoch, self.rank, lane, "buffer")
            )
        flips = _rng(self.seed, epoch, self.rank, lane, "flip")
        for i, size in enumerate(sizes):
            raw = list(islice(samples, size))
            flip = [self.flip and flips.random() < 0.5 for _ in raw]
            if len(raw) < size:
                reasons = "; ".join(f"{name}: {why}" for name, why in bad)
                raise DataError(f"{self.directory}: too few readable shards to fill a batch ({reasons})")
            if i < skip:
                continue
            # Converted here, in the worker (torch gives workers one thread): the main process only waits.
            images = torch.empty((len(raw), 3, self.resolution, self.resolution))
            planes = images.numpy()  # numpy's HWC -> CHW casting copy is about twice torch's here
            for k, (data, f) in enumerate(zip(raw, flip, strict=True)):
                planes[k] = np.asarray(_decode(data, self.pil_format, self.resolution, f)).transpose(2, 0, 1)
            yield images.div_(127.5).sub_(1.0), bad[:]
            bad.clear()


class _LaneDataset(IterableDataset):
    """What each DataLoader worker runs: its lane's batches from position (epoch, batch) onwards."""

    def __init__(self, plan: _Plan, epoch: int, batch: int) -> None:
        super().__init__()
        self.plan, self.epoch, self.batch = plan, epoch, batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[tuple[str, str]]]]:
        plan = self.plan
        info = get_worker_info()
        worker = info.id if info is not None else 0
        # Rotate so that worker 0 serves the next batch: DataLoader polls workers from 0 each time.
        lane = (worker + plan.lane_of(self.epoch, self.batch)) % plan.lanes
        epoch = self.epoch
        skip = sum(plan.lane_of(epoch, j) == lane for j in range(self.batch))
        while True:
            yield from plan.lane_batches(lane, epoch, skip)
            if not plan.training:
                return
            epoch, skip = epoch + 1, 0


class ShardStream:
    """Batches [B,3,R,R] in [-1, 1] from a shard directory for one rank; see the module docstring.

    training=True: seeded shard order and shuffle buffer per epoch, optional flip, endless, the same
    `batches_per_epoch` on every rank, resumable via state_dict/load_state_dict. The position is the
    same on every rank, so one rank's state can be loaded by all. training=False: each iteration is
    one pass over the split in manifest order, every sample once, batches of at most batch_size
    spread so every rank has the same count.
    """

    def __init__(
        self,
        cfg: DataConfig,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        *,
        batch_size: int | None = None,
        training: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        directory = Path(cfg.path)
        manifest = read_manifest(directory)
        if split not in manifest["splits"]:
            raise DataError(f"{directory} has no split {split!r}; it has {sorted(manifest['splits'])}")
        if cfg.resolution > manifest["resolution"]:
            raise DataError(
                f"data.resolution={cfg.resolution} but the shards in {directory} are "
                f"{manifest['resolution']} px: re-shard at >= {cfg.resolution} px"
            )
        self.batch_size = batch_size or cfg.batch_size
        self.num_workers = cfg.num_workers
        self.split, self.seed, self.world_size, self.training = split, seed, world_size, training
        self._plan = _Plan(
            directory,
            manifest["splits"][split]["shards"],
            pil_format=PIL_FORMATS[manifest["format"]],
            resolution=cfg.resolution,
            batch_size=self.batch_size,
            rank=rank,
            world_size=world_size,
            lanes=max(1, cfg.num_workers),
            seed=seed,
            training=training,
            flip=training and cfg.random_flip,
            shuffle_buffer=cfg.shuffle_buffer,
        )
        self.total = self._plan.total
        self.batches_per_epoch = self._plan.batches_per_epoch
        if self.batches_per_epoch < 1 or (not training and self.total < world_size):
            raise DataError(
                f"split {split!r} of {directory} has {self.total} images: too few for "
                f"world_size {world_size} x batch_size {self.batch_size}"
            )
        self.bad_shards: dict[str, str] = {}  # shard name -> why it was skipped
        self._epoch = 0
        self._batch = 0

    @property
    def rank_images(self) -> int:
        """Images this rank yields per epoch (its share of `total` when not training)."""
        return sum(self._plan.batch_sizes())

    @property
    def skipped_shards(self) -> int:
        """How many distinct shards were found bad and skipped so far."""
        return len(self.bad_shards)

    @property
    def epoch(self) -> int:
        return self._epoch

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch yielded, plus what must match for it to mean the same."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "batch": self._batch,
            "samples": self._batch * self.batch_size,
            "seed": self.seed,
            "split": self.split,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "total": self.total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.training:
            raise DataError("an evaluation stream (training=False) always starts its pass at the beginning")
        mine = self.state_dict()
        for key in ("version", "seed", "split", "world_size", "batch_size", "num_workers", "total"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"data stream state has {key}={state.get(key)!r} but this stream has {mine[key]!r}: "
                    "the saved position would not name the same batches"
                )
        if not 0 <= state["batch"] < self.batches_per_epoch or state["epoch"] < 0:
            raise DataError(
                f"data stream state position (epoch, batch) = ({state['epoch']}, {state['batch']}): "
                f"expected epoch >= 0 and batch in [0, {self.batches_per_epoch})"
            )
        self._epoch, self._batch = state["epoch"], state["batch"]

    def __iter__(self) -> Iterator[torch.Tensor]:
        if not self.training:
            self._epoch, self._batch = 0, 0
        dataset = _LaneDataset(self._plan, self._epoch, self._batch)
        loader = DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, pin_memory=torch.cuda.is_available()
        )
        for images, bad in loader:
            for name, why in bad:
                if name not in self.bad_shards:
                    self.bad_shards[name] = why
                    log.warning("skipped shard %s: %s", self._plan.directory / name, why)
            self._batch += 1
            if self._batch == self.batches_per_epoch:
                self._epoch, self._batch = self._epoch + 1, 0
            yield images
