"""Process groups outside training: the tools (sampling, evaluation) run as one process or as several
from `accelerate launch` / torchrun, each taking a share of the work and gathering on the main process."""

from __future__ import annotations

import os

import torch
from accelerate import PartialState

from dist_vae.errors import ConfigError


def needs_gloo() -> bool:
    """Several processes (torchrun's WORLD_SIZE) and no GPU: Accelerate would pick MPI, so the
    trainer and the tools ask for gloo."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def tool_state() -> PartialState:
    """Accelerate's process state, with gloo when there is no GPU.

    Without a GPU, Accelerate needs cpu=True to see torchrun's processes as MULTI_CPU.
    """
    return PartialState(cpu=not torch.cuda.is_available(), **({"backend": "gloo"} if needs_gloo() else {}))


def tool_device(name: str | None, state: PartialState) -> torch.device:
    """The device `--device NAME` names (None: this process's own), refused in one line (ConfigError)
    when this torch build or machine cannot use it, rather than an AssertionError deep inside `.to`."""
    if name is None:
        return state.device
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name!r} is not a device: {exc}") from exc
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(
            f"--device {name}: no such CUDA device here (torch {torch.__version__}, {build}, "
            f"{torch.cuda.device_count()} GPUs visible); use --device cpu or leave --device out"
        )
    return device


def share(total: int, rank: int, world_size: int) -> range:
    """Rank's contiguous part of range(total), sizes differing by at most one, in rank order."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))
