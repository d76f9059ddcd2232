"""Which global positions make which batch of one rank, and how a batch's pixels are made from them.

Training: global batch k covers positions [P, P + W*B) and rank r takes [P + r*B, P + (r+1)*B), so
batch j of an iteration that started at `start` is computed directly, by any worker, with nothing
replayed. Evaluation: the split in manifest order, cut into contiguous parts per rank (`share`)
and batches of at most B. Flips are drawn per (seed, epoch, sample).

A bad sample (hash mismatch, undecodable, its shard truncated, damaged or missing) is replaced by a
substitute: the first good one among hashed picks from the split, then in manifest order after the
last pick. The choice depends only on the files, so it is the same for every worker count; batch
count and sizes never change.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_vae.data.cache import ShardCache
from dist_vae.data.decode import read_pixels
from dist_vae.data.index import BadSample, ShardReader
from dist_vae.data.order import SampleOrder, mix
from dist_vae.distributed import share
from dist_vae.errors import DataError

SUBSTITUTE_PICKS = 16  # hashed picks for a bad sample's substitute before scanning in manifest order


@dataclass(frozen=True)
class Plan:
    """One rank's batches of one split (picklable: each DataLoader worker holds a copy)."""

    directory: Path | str  # a local directory or a URL (then read through `cache`)
    shards: list[dict[str, Any]]  # the manifest's entries of the split
    order: SampleOrder
    split: str
    pil_format: str
    resolution: int
    batch_size: int
    rank: int
    world_size: int
    training: bool
    flip: bool
    seed: int
    cache: ShardCache | None = None

    @property
    def first(self) -> int:
        """This rank's first position of an evaluation pass."""
        return share(self.order.total, self.rank, self.world_size).start

    @property
    def stop(self) -> int:
        """The position after this rank's last of an evaluation pass."""
        return share(self.order.total, self.rank, self.world_size).stop

    @property
    def batches(self) -> int:
        """Batches of this rank's evaluation pass."""
        return math.ceil((self.stop - self.first) / self.batch_size)

    def positions(self, start: int, j: int) -> range:
        """Positions of this rank's batch j of an iteration that started at `start`."""
        if self.training:
            base = start + j * self.world_size * self.batch_size + self.rank * self.batch_size
            return range(base, base + self.batch_size)
        lo = self.first + j * self.batch_size
        return range(lo, min(self.stop, lo + self.batch_size))

    def upcoming(self, start: int, j: int) -> Iterator[int]:
        """Shards in the order they are first needed from batch j on: in training the whole global
        batch's (the ranks of a node share them), in evaluation this rank's part of the pass."""
        if self.training:
            return self.order.upcoming(start + j * self.world_size * self.batch_size)
        lo = self.first + j * self.batch_size
        if lo >= self.stop:
            return iter(())
        last = self.order.in_manifest_order(self.stop - 1)[0]
        return itertools.takewhile(lambda shard: shard <= last, self.order.upcoming(lo))

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

    def _pixels(self, reader: ShardReader, shard: int, sample: int) -> tuple[np.ndarray, str]:
        return read_pixels(reader, shard, sample, self.pil_format, self.resolution)

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
