"""Process groups outside training: the tools (sampling, evaluation) run as one process or as several
from `accelerate launch` / torchrun, each taking a share of the work and gathering on the main process."""

from __future__ import annotations

import os

import torch
from accelerate import PartialState


def needs_gloo() -> bool:
    """Several processes (torchrun's WORLD_SIZE) and no GPU: Accelerate would pick MPI, so the
    trainer and the tools ask for gloo."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def tool_state() -> PartialState:
    """Accelerate's process state, with gloo when there is no GPU.

    Without a GPU, Accelerate needs cpu=True to see torchrun's processes as MULTI_CPU.
    """
    return PartialState(cpu=not torch.cuda.is_available(), **({"backend": "gloo"} if needs_gloo() else {}))


def share(total: int, rank: int, world_size: int) -> range:
    """Rank's contiguous part of range(total), sizes differing by at most one, in rank order."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))
