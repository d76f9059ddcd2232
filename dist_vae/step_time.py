"""A training step's time on a GPU, predicted: max(the arithmetic at a stated MFU, the host floor).

On a GPU in eager mode the host issues every aten operation of a step (dispatcher, Python, one
kernel launch each), whatever the batch: when the arithmetic is small the GPU waits for the host and
the step costs operations x seconds per operation. A step is `compute-bound` when its arithmetic takes
longer than that floor, else `host-bound`. Three ways of executing a step:

  eager     every operation is issued by the host: EAGER_S_PER_OP each.
  compiled  torch.compile fuses elementwise chains; convolutions and matmuls stay one kernel each, so
            COMPILED_KERNEL_FRACTION of the operations remain as kernels, COMPILED_S_PER_KERNEL each
            (inductor's wrapper launches them without the dispatcher).
  graphed   a CUDA graph replays the captured kernels without the host: the floor is the GPU's own
            gap between back-to-back small kernels, GRAPHED_S_PER_KERNEL per compiled kernel.

Operations: aten operations dispatched below autograd (what torch.compile traces) of one forward +
backward on fake tensors at batch 1, the forward recomputed by gradient checkpointing included when
it is on. Their number does not depend on the batch; the arithmetic grows with it, so the smallest
compute-bound batch is floor x MFU x peak / FLOPs per image.

The constants and their sources (each to be checked on the first GPU, docs/performance.md):
- EAGER_S_PER_OP 10 us: measured on the project's CPU VM, where the iterative VAE with its
  arithmetic shrunk (model.channels=4, 64 px, checkpointing on: 30,065 such operations; 45,443 as
  torch.profiler counts them, nested) takes 0.30 s per step, 10.0 us per operation (6.5 us per
  profiler event); a GPU host pays about the same dispatch plus a kernel launch (5 to 10 us per launch
  on H100 hosts with Python overhead is the usual figure), so 10 us is a low estimate there.
- COMPILED_KERNEL_FRACTION 0.3 and COMPILED_S_PER_KERNEL 5 us: estimates (no GPU measured yet):
  about a third of these models' operations are convolutions, their backward, and reductions that
  inductor keeps as kernels of their own; a launch from inductor's generated code costs ~5 us.
- GRAPHED_S_PER_KERNEL 1.5 us: the usual replay gap plus the shortest kernel's runtime on a GPU.
- MFU 0.40 of the datasheet peak when compute-bound (the FID-cost estimates use the same).
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dist_vae.compat.torch_ops import FakeTensorMode, TorchDispatchMode
from dist_vae.flops import COUNT_BATCH, counted_step, run_step

EAGER_S_PER_OP = 10e-6
COMPILED_KERNEL_FRACTION = 0.3
COMPILED_S_PER_KERNEL = 5e-6
GRAPHED_S_PER_KERNEL = 1.5e-6
MFU = 0.40
MODES = ("eager", "compiled", "graphed")


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += 1
        return func(*args, **(kwargs or {}))


def operations_per_step(build: Any, resolution: int) -> int:
    """Operations of one training step at batch 1 (recomputation included) of the model `build()`
    makes; it is built inside a FakeTensorMode, so nothing is computed."""
    counter = OpCounter()
    with FakeTensorMode():
        model = build()
        x = torch.empty(1, 3, resolution, resolution)
        with counter:
            run_step(model, x, None, training=True)
    return counter.calls


class _Both:
    def __init__(self, *modes: Any) -> None:
        self.modes, self.stack = modes, ExitStack()

    def __enter__(self) -> None:
        for mode in self.modes:
            self.stack.enter_context(mode)

    def __exit__(self, *exc: object) -> None:
        self.stack.close()


def flops_and_operations(model: nn.Module, resolution: int) -> tuple[float, int]:
    """FLOPs per image and operations per step in one fake pass, without recomputation (so the
    operations are a lower bound of a checkpointed step's: what the start-up warning uses)."""
    flops, counter = FlopCounterMode(display=False), OpCounter()
    counted_step(model, resolution, _Both(flops, counter), training=True)
    return flops.get_total_flops() / COUNT_BATCH, counter.calls


def floor_seconds(operations: int, mode: str) -> float:
    if mode == "eager":
        return operations * EAGER_S_PER_OP
    kernels = operations * COMPILED_KERNEL_FRACTION
    return kernels * (COMPILED_S_PER_KERNEL if mode == "compiled" else GRAPHED_S_PER_KERNEL)


@dataclass
class Prediction:
    mode: str
    compute_s: float  # the arithmetic at MFU
    floor_s: float
    min_batch: int  # the smallest per-GPU batch whose arithmetic outlasts the floor

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.floor_s)

    @property
    def regime(self) -> str:
        return "compute-bound" if self.compute_s >= self.floor_s else "host-bound"

    @property
    def mfu(self) -> float:
        return MFU * self.compute_s / self.step_s


def predict(operations: int, flops_per_image: float, batch: int, peak: float, mode: str) -> Prediction:
    """The step of `batch` images per GPU on a GPU of `peak` FLOP/s executed in `mode`."""
    floor = floor_seconds(operations, mode)
    compute = batch * flops_per_image / (MFU * peak)
    return Prediction(mode, compute, floor, max(1, math.ceil(floor * MFU * peak / flops_per_image)))


def host_bound_warning(operations: int, flops_per_image: float, batch: int, peak: float, mode: str) -> str:
    """One line when the step is predicted host-bound, else ''."""
    p = predict(operations, flops_per_image, batch, peak, mode)
    if p.regime == "compute-bound":
        return ""
    return (
        f"warning: this step is predicted host-bound in {mode} mode: at least {operations:,} operations "
        f"take the host {p.floor_s * 1e3:.0f} ms against {p.compute_s * 1e3:.1f} ms of arithmetic for "
        f"{batch} images (MFU ~{p.mfu:.0%}); a per-GPU batch of {p.min_batch} or CUDA graphs would be "
        "compute-bound (tools/plan_memory.py, docs/performance.md)"
    )
