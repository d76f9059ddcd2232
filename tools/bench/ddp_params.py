"""Host time DDP adds per parameter tensor: its hook hands each gradient to the reducer, which copies it
into an all-reduce bucket (on a GPU a kernel launch each). The planner's floors leave this out
(docs/performance.md, host floor): it grows with the number of parameter tensors, not with the model's
operations, and stays outside any CUDA graph.

    PYTHONPATH=. python tools/bench/ddp_params.py [--tensors 1818] [--rounds 5] [--steps 10]

Two gloo processes on this machine. Each step is a forward that sums every parameter tensor and its
backward, with and without DDP around the same module, the two taking turns step by step (a shared
machine's speed drifts over seconds). Printed per round: both steps' time and what DDP adds per
parameter tensor; the median round last. 1,818 tensors: lsun_256_iterative; 711: lsun_64_pixelvae.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class Sums(nn.Module):
    """`tensors` small parameters; the forward's only arithmetic is one sum of each."""

    def __init__(self, tensors: int) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(4)) for _ in range(tensors))

    def forward(self, scale: torch.Tensor) -> torch.Tensor:
        return torch.stack([w.sum() for w in self.weights]).sum() * scale


def timed_step(model: nn.Module, params: list[nn.Parameter]) -> float:
    started = time.perf_counter()
    model(torch.ones(())).backward()
    for p in params:
        p.grad = None
    return time.perf_counter() - started


def worker(rank: int, store: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    plain, wrapped = Sums(args.tensors), Sums(args.tensors)
    ddp = DistributedDataParallel(wrapped)
    pairs = [(plain, list(plain.parameters())), (ddp, list(wrapped.parameters()))]
    for model, params in pairs:  # warm-up: DDP builds its buckets in the first backward
        for _ in range(2):
            timed_step(model, params)
    added = []
    for r in range(args.rounds):
        times: list[list[float]] = [[], []]
        for _ in range(args.steps):
            for i, (model, params) in enumerate(pairs):
                times[i].append(timed_step(model, params))
        bare, with_ddp = (statistics.median(t) for t in times)
        added.append((with_ddp - bare) / args.tensors)
        if rank == 0:
            print(f"round {r + 1}: step {bare * 1e3:.1f} ms, under DDP {with_ddp * 1e3:.1f} ms "
                  f"(x{with_ddp / bare:.2f}): {added[-1] * 1e6:.1f} us per parameter tensor")  # fmt: skip
    if rank == 0:
        per = statistics.median(added)
        print(f"median: DDP adds {per * 1e6:.1f} us per parameter tensor, "
              f"{per * args.tensors * 1e3:.1f} ms per step for {args.tensors:,}")  # fmt: skip
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=1818)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(os.path.join(tmp, "store"), args), nprocs=2)


if __name__ == "__main__":
    main()
