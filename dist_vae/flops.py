"""Model FLOPs per image (counted by PyTorch, never by hand), and the peak FLOP/s of known devices.

MFU = achieved model FLOP/s / peak. Model FLOPs are those of one forward and one backward pass
without the forward recomputed by gradient checkpointing (the usual convention: checkpointing costs
time and so lowers MFU). Counting runs the model on fake tensors (shapes only, no data, no memory),
so it takes seconds on a CPU whatever the model's size and leaves the model untouched.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dist_vae.compat.torch_ops import FakeTensorMode
from dist_vae.precision import NAMES

COUNT_BATCH = 2  # MMD and the critic compare images within a batch; 2 is the smallest real batch

# Dense (no structured sparsity) peak tensor-core FLOP/s from the vendors' datasheets, per GPU.
# "fp32" is the TF32 tensor-core figure, used when cuDNN may use TF32 (PyTorch's default for
# convolutions, which are nearly all of these models' FLOPs); "fp32_strict" the CUDA-core one.
# Patterns are tried in order, so the more specific names come first.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    (r"B200", {"bf16": 2.25e15, "fp16": 2.25e15, "fp32": 1.1e15, "fp32_strict": 75e12}),
    (r"H200 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "fp32": 417.5e12, "fp32_strict": 60e12}),
    (r"H200", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12, "fp32_strict": 66.9e12}),
    (r"H100 (PCIe|NVL)", {"bf16": 756.5e12, "fp16": 756.5e12, "fp32": 378e12, "fp32_strict": 51.2e12}),
    (r"H100", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12, "fp32_strict": 66.9e12}),
    (r"A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12, "fp32_strict": 19.5e12}),
    (r"L40S", {"bf16": 362.05e12, "fp16": 362.05e12, "fp32": 183e12, "fp32_strict": 91.6e12}),
    (r"L40", {"bf16": 181e12, "fp16": 181e12, "fp32": 90.5e12, "fp32_strict": 90.5e12}),
    (r"\bL4\b", {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12, "fp32_strict": 30.3e12}),
    (r"RTX 4090", {"bf16": 165.2e12, "fp16": 165.2e12, "fp32": 82.6e12, "fp32_strict": 82.6e12}),
    (r"RTX A6000", {"bf16": 154.8e12, "fp16": 154.8e12, "fp32": 77.4e12, "fp32_strict": 38.7e12}),
    (r"\bA10\b", {"bf16": 125e12, "fp16": 125e12, "fp32": 62.5e12, "fp32_strict": 31.2e12}),
    (r"V100.*PCIE", {"fp16": 112e12, "fp32": 14e12, "fp32_strict": 14e12}),
    (r"V100", {"fp16": 125e12, "fp32": 15.7e12, "fp32_strict": 15.7e12}),
    (r"\bT4\b", {"fp16": 65e12, "fp32": 8.1e12, "fp32_strict": 8.1e12}),
]


def peak_flops(device: torch.device, dtype: torch.dtype, override: float | None = None) -> float | None:
    """Peak FLOP/s of `device` computing in `dtype`: `override` when given (train.peak_flops), else the
    datasheet figure for a known CUDA device, else None (CPUs, unknown GPUs, dtypes a GPU lacks)."""
    if override is not None:
        return float(override)
    if device.type != "cuda" or dtype not in NAMES:
        return None
    return lookup_peak(torch.cuda.get_device_name(device), dtype)


def lookup_peak(name: str, dtype: torch.dtype) -> float | None:
    """The table's figure for a device called `name` (as torch.cuda.get_device_name gives it)."""
    key = NAMES.get(dtype)
    if key == "fp32" and not torch.backends.cudnn.allow_tf32:
        key = "fp32_strict"
    for pattern, figures in PEAK_FLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return figures.get(key or "")
    return None


@contextmanager
def without_checkpointing(model: nn.Module) -> Iterator[None]:
    """Turn off every submodule's `gradient_checkpointing` flag (the models' convention) for a while."""
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    for module in flagged:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in flagged:
            module.gradient_checkpointing = True


@contextmanager
def fake_state(model: nn.Module) -> Iterator[tuple[FakeTensorMode, dict[str, torch.Tensor]]]:
    """A FakeTensorMode and fake copies of the model's parameters and buffers (for functional_call)."""
    with FakeTensorMode() as mode:
        state = {n: mode.from_tensor(p).requires_grad_(p.requires_grad) for n, p in model.named_parameters()}
        state.update({n: mode.from_tensor(b) for n, b in model.named_buffers()})
        yield mode, state


def run_step(
    model: nn.Module, x: torch.Tensor, state: dict[str, torch.Tensor] | None, training: bool
) -> None:
    """One forward (and, training, one backward of the total loss) of `model` on x, with `state`
    substituted for its parameters and buffers when given."""
    with torch.set_grad_enabled(training):
        if state is None:
            out = model(x, step=0)
        else:
            out = torch.func.functional_call(model, state, (x,), {"step": 0})
        if training:
            out.total().backward()


def counted_step(
    model: nn.Module, resolution: int, mode: AbstractContextManager[Any], training: bool
) -> None:
    """One step of `model` on a fake batch of `resolution` px with `mode` (a counter) active: forward
    and, `training`, backward, without the recomputation of gradient checkpointing."""
    with without_checkpointing(model), fake_state(model) as (_, state):
        device = next(model.parameters()).device
        x = torch.empty(COUNT_BATCH, 3, resolution, resolution, device=device)
        with mode:
            run_step(model, x, state, training)


def flops_per_image(model: nn.Module, resolution: int, *, training: bool = True) -> float:
    """Model FLOPs of one image: forward + backward when `training`, forward alone otherwise."""
    counter = FlopCounterMode(display=False)
    counted_step(model, resolution, counter, training)
    return counter.get_total_flops() / COUNT_BATCH
