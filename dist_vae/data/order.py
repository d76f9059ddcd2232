"""The sample sequence of a split: global position -> (shard, sample), the same in every process.

Training: epoch e is a seeded permutation of the split's N samples. The shards are shuffled, cut
into groups of `group` consecutive shards, and the samples of each group are permuted among
themselves, so reading a group touches only its shards while images from `group` shards mix. The
sequence is epoch 0 ++ epoch 1 ++ ..., so position p is sample p % N of epoch p // N.
Evaluation: the split in manifest order, once.

Everything is computed from the manifest's per-shard counts and the seed, lazily per group, so a
worker finds the sample at any position without replaying anything (3M samples cost no memory).
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Iterator
from functools import lru_cache

import numpy as np


def mix(*parts: int | str) -> int:
    """A 64-bit hash of `parts`, the same in every process (unlike the salted hash())."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


class SampleOrder:
    """Where each position of the split's sample sequence comes from."""

    def __init__(self, counts: list[int], seed: int, group: int, shuffle: bool) -> None:
        self.counts, self.seed, self.group, self.shuffle = counts, seed, group, shuffle
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # manifest order
        self.total = int(self.starts[-1])
        # Instance-bound caches, small: a worker moves through an epoch group by group.
        self._epoch_plan = lru_cache(maxsize=2)(self._plan_epoch)
        self._group_perm = lru_cache(maxsize=8)(self._permute_group)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["counts"], state["seed"], state["group"], state["shuffle"])  # type: ignore[misc]

    def in_manifest_order(self, index: int) -> tuple[int, int]:
        """(shard, sample) of the split's `index`-th sample in manifest order."""
        shard = bisect_right(self.starts, index) - 1
        return shard, index - int(self.starts[shard])

    def _plan_epoch(self, epoch: int) -> tuple[np.ndarray, list[int]]:
        """The epoch's shard order and the first epoch index of each group (plus the end)."""
        order = np.random.default_rng(mix(self.seed, epoch, "shards")).permutation(len(self.counts))
        sizes = np.asarray(self.counts, dtype=np.int64)[order]
        bounds = np.concatenate([[0], np.cumsum(sizes)])[:: self.group].tolist()
        if bounds[-1] != self.total:
            bounds.append(self.total)
        return order, bounds

    def _permute_group(self, epoch: int, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The group's shards, their first index within the group, and its sample permutation."""
        order, bounds = self._epoch_plan(epoch)
        shards = order[group * self.group : (group + 1) * self.group]
        starts = np.concatenate([[0], np.cumsum(np.asarray(self.counts, dtype=np.int64)[shards])])
        size = bounds[group + 1] - bounds[group]
        perm = np.random.default_rng(mix(self.seed, epoch, group, "samples")).permutation(size)
        return shards, starts, perm

    def locate(self, epoch: int, index: int) -> tuple[int, int]:
        """(shard, sample) at `index` in `epoch` (0 <= index < total)."""
        if not self.shuffle:
            return self.in_manifest_order(index)
        _, bounds = self._epoch_plan(epoch)
        group = bisect_right(bounds, index) - 1
        shards, starts, perm = self._group_perm(epoch, group)
        within = int(perm[index - bounds[group]])
        k = bisect_right(starts.tolist(), within) - 1
        return int(shards[k]), within - int(starts[k])

    def upcoming(self, position: int) -> Iterator[int]:
        """Shards in the order the sequence first needs them from `position` on, starting with those
        the group being read still needs; endless when shuffled (each epoch names every shard again)."""
        epoch, index = divmod(position, self.total)
        if not self.shuffle:
            shard = self.in_manifest_order(index)[0] if epoch == 0 else len(self.counts)
            yield from (s for s in range(shard, len(self.counts)) if self.counts[s])
            return
        while True:
            _, bounds = self._epoch_plan(epoch)
            for group in range(bisect_right(bounds, index) - 1, len(bounds) - 1):
                shards, starts, perm = self._group_perm(epoch, group)
                which = np.searchsorted(starts, perm[max(0, index - bounds[group]) :], side="right") - 1
                _, first = np.unique(which, return_index=True)
                yield from shards[which[np.sort(first)]].tolist()
            epoch, index = epoch + 1, 0

    def at(self, position: int) -> tuple[int, int, int]:
        """(epoch, shard, sample) at a global position of the sequence."""
        epoch, index = divmod(position, self.total)
        return (epoch, *self.locate(epoch, index))

    def sample_id(self, shard: int, sample: int) -> int:
        """The sample's index in manifest order: its identity across epochs."""
        return int(self.starts[shard]) + sample
