"""Which source key goes to which shard, decided by the keys alone.

The train/val split comes from a hash of each key and the samples are ordered by that hash, so the
shards' contents depend neither on the source's order nor on the worker count.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

SPLIT_RULE = "val if int.from_bytes(sha256(key)[:8], 'big') / 2**64 < val_fraction else train"


def split_of(key: str, val_fraction: float) -> str:
    """'val' or 'train', decided by the key alone so every run and every worker agrees."""
    head = hashlib.sha256(key.encode()).digest()[:8]
    return "val" if int.from_bytes(head, "big") / 2**64 < val_fraction else "train"


def sample_name(key: str) -> str:
    """The tar member stem: a hash, since source keys may hold '/' or '.' that webdataset splits on."""
    return hashlib.sha256(key.encode()).hexdigest()[:40]


@dataclass(frozen=True)
class ShardJob:
    """The keys of one shard, in the order they are written."""

    split: str
    index: int
    keys: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"


def shard_jobs(keys: Iterable[str], val_fraction: float, shard_size: int) -> list[ShardJob]:
    """Split by key hash, order each split by sample name, cut into shards of `shard_size` keys."""
    by_split: dict[str, list[str]] = {"train": [], "val": []}
    for key in keys:
        by_split[split_of(key, val_fraction)].append(key)
    jobs = []
    for split, members in by_split.items():
        members.sort(key=lambda k: (sample_name(k), k))
        for i in range(0, len(members), shard_size):
            jobs.append(ShardJob(split, i // shard_size, tuple(members[i : i + shard_size])))
    return jobs
