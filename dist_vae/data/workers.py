"""The DataLoader worker processes of a stream: what each runs, how they start, and how they stop.

Within a rank, batch j (counted from where the iteration started) is made by worker (lane) j % L,
which computes its positions directly and preads each image by offset (plan.py, index.py); from a
URL, each worker also fetches the shards its next batches need ahead of it (prefetch.py).

Workers die with their parent (PR_SET_PDEATHSIG) and ignore SIGTERM, SIGUSR1 and SIGINT, which the main
process handles (it must checkpoint before anything exits). Because they ignore SIGTERM,
multiprocessing's exit hook (terminate, then join) would wait forever for the workers of an
iteration still open when the interpreter exits; `_stop_open_iterations` stops them first (atexit
runs hooks last in, first out, and this module is imported after multiprocessing). The registry
is module state because the exit hook is: it must reach the open iterations of every stream.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import os
import signal
import sys
import weakref
from collections.abc import Iterator
from typing import Any, NoReturn

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_vae.compat.torch_data import shutdown_workers
from dist_vae.data import storage
from dist_vae.data.buffers import BatchBuffers
from dist_vae.data.index import ShardReader
from dist_vae.data.plan import Plan
from dist_vae.data.prefetch import ReadAhead
from dist_vae.data.storage import StoreUnreachable, mark_leaf
from dist_vae.errors import DataError

_PR_SET_PDEATHSIG = 1
_open_iterations: weakref.WeakSet[Any] = weakref.WeakSet()

# pixels, buffer slot, keys, replaced, (worker pid, its object-store retries, bytes) so far
Batch = tuple[torch.Tensor, int, list[str], list[tuple[str, str]], tuple[int, int, int]]
# A batch that could not be made: {"error": the DataError's class name, "message": its message}
Failure = dict[str, str]


def failure(exc: DataError) -> Failure:
    """What a worker sends instead of a batch: plain data, which `raise_failure` turns back into the
    error (a StoreUnreachable stays one, so the trainer can tell it from a refusal)."""
    return {"error": type(exc).__name__, "message": str(exc)}


def raise_failure(item: Failure) -> NoReturn:
    kind = StoreUnreachable if item["error"] == StoreUnreachable.__name__ else DataError
    raise kind(item["message"])


class Lanes(IterableDataset):
    """What each DataLoader worker (lane) runs: batches j = lane, lane + L, ... from `start`."""

    def __init__(self, plan: Plan, start: int, buffers: BatchBuffers) -> None:
        super().__init__()
        self.plan, self.start, self.buffers = plan, start, buffers

    def __iter__(self) -> Iterator[Batch | Failure]:
        """A Batch per batch; a Failure instead, which the main process raises as one clean line."""
        info = get_worker_info()
        lane, lanes = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = ShardReader(self.plan.directory, self.plan.shards, self.plan.cache)
        cache = self.plan.cache
        ahead = ReadAhead(self.plan, cache) if cache is not None and info is not None else None
        try:
            j = lane
            while self.plan.training or j < self.plan.batches:
                if ahead is not None:
                    ahead.advance(self.start, j)
                shape = self.plan.shape(self.start, j)
                if info is None:
                    slot, out = -1, torch.empty(shape, dtype=torch.uint8)
                else:
                    slot, out = self.buffers.take(lane, shape)
                try:
                    keys, bad = self.plan.fill(out, reader, self.start, j)
                except DataError as exc:
                    yield failure(exc)
                    return
                yield (
                    out,
                    slot,
                    keys,
                    bad,
                    (os.getpid(), storage.counters["retries"], storage.counters["bytes"]),
                )
                j += lanes
        finally:
            reader.close()
            if ahead is not None:
                ahead.close()


@contextlib.contextmanager
def worker_batches(lanes: Lanes, workers: int) -> Iterator[Iterator[Batch | Failure]]:
    """Iterate `lanes` on `workers` processes (0: in this one); their workers stop on leaving."""
    loader = DataLoader(
        lanes,
        batch_size=None,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=functools.partial(_worker_init, os.getpid()) if workers else None,
    )
    iteration = iter(loader)
    if workers:
        _open_iterations.add(iteration)
    try:
        yield iteration
    finally:
        if workers:  # now, not whenever a traceback that holds this frame is freed
            shutdown_workers(iteration)


@atexit.register
def _stop_open_iterations() -> None:
    """Shut down the workers of iterations still open at exit (see the module doc)."""
    for iteration in list(_open_iterations):
        shutdown_workers(iteration)


def _worker_init(parent: int, worker_id: int) -> None:
    """Leave SIGTERM/SIGUSR1/SIGINT (Ctrl-C reaches the whole process group) to the main process and
    die with it (not ~5 s later by polling)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    mark_leaf()  # forks nothing: may hold its own object-store client
