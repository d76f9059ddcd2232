"""The process group of the tools (sampling, evaluation): one process, or several from `accelerate
launch` / torchrun, each taking a share of the work and gathering the results on the main process."""

from __future__ import annotations

import os

import torch
from accelerate import PartialState


def tool_state() -> PartialState:
    """Accelerate's process state, with gloo when there is no GPU.

    Without a GPU, Accelerate needs cpu=True to see torchrun's processes as MULTI_CPU, and would
    then pick MPI unless told gloo (the same choice the trainer makes).
    """
    no_gpu = not torch.cuda.is_available()
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=no_gpu, **({"backend": "gloo"} if no_gpu and multi else {}))


def share(total: int, rank: int, world_size: int) -> range:
    """Rank's contiguous part of range(total), sizes differing by at most one, in rank order."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))
