"""Every collective and process-group helper of the project, and the one rule for a rank's share.

The trainer reaches its collectives through an Accelerator (`agree`, `spread`, `sum_over_ranks`); metrics and
the tools use the default process group (`world`, `agreed`, `gather_rows`) and Accelerate's process
state (`tool_state`, `tool_device`). Work over ranks is always split by `share`.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable

import torch
from accelerate import Accelerator, PartialState
from torch import distributed as dist

from dist_vae.errors import ConfigError


def share(total: int, rank: int, world_size: int) -> range:
    """Rank's contiguous part of range(total), sizes differing by at most one, in rank order."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def agree(acc: Accelerator, values: list[torch.Tensor]) -> list[float]:
    """Every rank's maximum of each value, read on the host: a step's one device read."""
    votes = torch.stack([v.float().reshape(()) for v in values])
    if acc.num_processes > 1:
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return votes.tolist()


def agree_on_device(acc: Accelerator, values: list[torch.Tensor]) -> torch.Tensor:
    """Every rank's maximum of each value, left on the device (no host read: a step's votes)."""
    votes = torch.stack([v.float().reshape(()) for v in values])
    if acc.num_processes > 1:
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return votes


def spread(acc: Accelerator, value: int) -> tuple[int, int]:
    """(lowest, highest) of `value` over the ranks (collective; exact below 2**24)."""
    votes = agree(acc, [torch.tensor(float(v), device=acc.device) for v in (value, -value)])
    return int(-votes[1]), int(votes[0])


def host_vote(acc: Accelerator) -> Callable[[bool], bool]:
    """`vote(flag)`: whether any rank's flag is set, agreed on the host over gloo (beside NCCL, a gloo
    group of its own), so calling it never waits for the device. Collective to make and to call."""
    if acc.num_processes == 1:
        return bool
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def vote(flag: bool) -> bool:
        box = torch.tensor([int(flag)])
        dist.all_reduce(box, op=dist.ReduceOp.MAX, group=group)
        return bool(box[0])

    return vote


def sum_over_ranks(acc: Accelerator, counts: list[int]) -> list[int]:
    """Integer counts summed over every rank (collective)."""
    total = torch.tensor(counts, device=acc.device)
    if acc.num_processes > 1:
        dist.all_reduce(total)
    return total.tolist()


def rank0_says(acc: Accelerator, text: str | None) -> str | None:
    """Rank 0's `text` (a refusal only it could see, or None) on every rank (collective)."""
    if acc.num_processes == 1:
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_device(default: torch.device | str) -> torch.device:
    """Where the default group's collectives take their tensors: this process's GPU under NCCL, which
    takes no CPU tensor; `default` elsewhere."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device(default)
    )


def agreed(value: int, op: dist.ReduceOp.RedOpType) -> int:
    """`value` reduced over the ranks with `op` (MIN of flags: every rank's; MAX: any rank's)."""
    if world()[1] == 1:
        return value
    count = torch.tensor([value], device=_collective_device("cpu"))
    dist.all_reduce(count, op=op)
    return int(count.item())


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order, on every rank (shares may differ in size), on
    `local`'s device; through the GPU under NCCL, which takes no CPU tensor (a tool's --device cpu)."""
    if world()[1] == 1:
        return local
    # torchmetrics is the optional [metrics] extra: loaded only where rows are gathered.
    from torchmetrics.utilities.distributed import gather_all_tensors

    rows = local.contiguous().to(_collective_device(local.device))
    return torch.cat(gather_all_tensors(rows)).to(local.device)


def needs_gloo() -> bool:
    """Several processes (torchrun's WORLD_SIZE) and no GPU: Accelerate would pick MPI, so the
    trainer and the tools ask for gloo."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def tool_state() -> PartialState:
    """Accelerate's process state for the tools, with gloo when there is no GPU.

    Without a GPU, Accelerate needs cpu=True to see torchrun's processes as MULTI_CPU. The process
    group is destroyed at exit, as the trainer does: a gloo group whose threads live on into the
    interpreter's shutdown can abort a finished process ("terminate called without an active
    exception", SIGABRT), which the launcher reports as a failed run.
    """
    state = PartialState(cpu=not torch.cuda.is_available(), **({"backend": "gloo"} if needs_gloo() else {}))
    atexit.register(state.destroy_process_group)
    return state


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
