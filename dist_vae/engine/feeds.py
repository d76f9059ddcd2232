"""The trainer's data: the train stream it resumes, the val stream each evaluation reads from its
start, and the bad data met, summed over ranks and over the runs this one continues. The only engine
module that builds a ShardStream (data/stream.py).

An object store that stays unreachable through its retries (`StoreUnreachable`) stops the run after a
checkpoint of the last completed step (trainer.py). With several processes every rank must stop at
the same point, or the others would wait for it in the step's collectives: each train batch is
yielded once every rank has its own (one vote on the host per batch, only when reading an object
store), and validation agrees in the sum it ends with (periodic.py). A rank that read its batch when
another could not raises `PeerUnreachable`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate import Accelerator

from dist_vae.data.config import DataConfig
from dist_vae.data.storage import StoreUnreachable, is_url
from dist_vae.data.stream import ShardStream, read_manifest, remote_store
from dist_vae.distributed import host_vote, sum_over_ranks

log = logging.getLogger(__name__)


class PeerUnreachable(StoreUnreachable):
    """Another rank found the object store unreachable; this one read its own data."""

    def __init__(self) -> None:
        super().__init__("another rank found the object store unreachable after its retries")


def check_data(data: DataConfig) -> None:
    """A wrong data.path fails before any process group exists."""
    read_manifest(data.path, remote_store(data) if is_url(data.path) else None)


class Streams:
    def __init__(self, data: DataConfig, seed: int, acc: Accelerator) -> None:
        self.accelerator = acc
        self.batch_size = data.batch_size  # per rank, as train.resize settled it
        rank, world = acc.process_index, acc.num_processes
        self.train = ShardStream(
            data, "train", rank, world, seed, batch_size=self.batch_size, device=acc.device
        )
        # A missing val split fails now, not at the first evaluation; an empty one turns validation off.
        self.val = ShardStream(
            data, "val", rank, world, seed, batch_size=self.batch_size, training=False, device=acc.device
        )
        self.validate = self.val.total > 0
        if not self.validate and acc.is_main_process:
            log.warning("split 'val' of %s is empty: validation is off", data.path)
        self.skipped_before = {"shards": 0, "samples": 0}  # by the runs this one resumes
        self._vote = host_vote(acc) if self.train.is_remote and acc.num_processes > 1 else None

    def train_batches(self) -> Iterator[torch.Tensor]:
        """The train stream's batches from its position, agreed over ranks (see the module doc)."""
        batches = iter(self.train)
        return batches if self._vote is None else agreed_batches(batches, self._vote)

    @contextlib.contextmanager
    def whole_step(self) -> Iterator[None]:
        """Around one update: an unreachable store leaves the train position where the update began,
        so the checkpoint written then is of the last completed step."""
        begun = self.train.position
        try:
            yield
        except StoreUnreachable:
            self.train.position = begun
            raise

    def remote(self) -> dict[str, int]:
        """The train stream's object-store retries and bytes, summed over ranks; {} for local data."""
        if not self.train.is_remote:
            return {}
        counts = sum_over_ranks(self.accelerator, list(self.train.remote.values()))
        return dict(zip(self.train.remote, counts, strict=True))

    def skipped(self) -> dict[str, int]:
        """Bad shards and replaced samples met since the run began, summed over ranks (collective)."""
        counts = sum_over_ranks(self.accelerator, [self.train.skipped[key] for key in self.skipped_before])
        return {key: self.skipped_before[key] + n for key, n in zip(self.skipped_before, counts, strict=True)}

    def load_state_dict(self, meta: dict[str, Any]) -> None:
        """The position and bad-data counts a checkpoint's meta recorded."""
        self.train.load_state_dict(meta["data"])
        self.skipped_before = {key: int(meta["skipped"][key]) for key in self.skipped_before}


def agreed_batches(batches: Iterator[torch.Tensor], vote: Callable[[bool], bool]) -> Iterator[torch.Tensor]:
    """Each batch once every rank has its own; an unreachable store on any rank stops all here."""
    while True:
        try:
            batch = next(batches)
        except StoreUnreachable:
            vote(True)
            raise
        if vote(False):
            raise PeerUnreachable
        yield batch


def static_batches(batches: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Each batch copied into one buffer of fixed address and shape, the inputs a captured step
    (train.cuda_graphs) replays from; a batch of another shape or dtype gets a buffer of its own."""
    buffer: torch.Tensor | None = None
    for batch in batches:
        if buffer is None or buffer.shape != batch.shape or buffer.dtype != batch.dtype:
            buffer = torch.empty_like(batch)
        yield buffer.copy_(batch)
