"""The shared-memory batch buffers DataLoader workers fill, reused once the main process lets go.

A fresh shared-memory segment per batch costs a worker kernel time (faulting in and zeroing new
pages, unmapping old ones) on every batch. `free` is itself
in shared memory, made before the workers start. A slot is refilled only after the main process
released it (having made its own float copy), and a worker that finds none of its slots free
makes a fresh buffer rather than wait, so a slow or failed release costs speed, never data.
"""

from __future__ import annotations

import torch

from dist_vae.compat.torch_data import shared_uint8

SLOTS_PER_WORKER = 4  # the DataLoader's 2 batches in flight per worker, the one being filled, a spare


class BatchBuffers:
    """One iteration's buffer slots, `SLOTS_PER_WORKER` per worker (lane)."""

    def __init__(self, workers: int) -> None:
        self.free = torch.ones(workers * SLOTS_PER_WORKER, dtype=torch.bool).share_memory_()
        self._mine: dict[int, torch.Tensor] = {}  # filled in each worker process

    def take(self, lane: int, shape: tuple[int, ...]) -> tuple[int, torch.Tensor]:
        """(slot, buffer) for one batch of `shape` from worker `lane`; slot -1: not reused."""
        for slot in range(lane * SLOTS_PER_WORKER, (lane + 1) * SLOTS_PER_WORKER):
            if self.free[slot]:
                buffer = self._mine.get(slot)
                if buffer is None or buffer.shape != shape:
                    buffer = self._mine[slot] = shared_uint8(shape)
                self.free[slot] = False
                return slot, buffer
        return -1, shared_uint8(shape)

    def release(self, slot: int) -> None:
        if slot >= 0:
            self.free[slot] = True
