"""DeepSpeed's private fields that checkpointing and the update path rely on, in one place.

Supported: deepspeed 0.19.x (the suite runs 0.19.8). These names are not DeepSpeed's public API:
the ZeRO-1/2 optimizer's gradient buffers and micro-step id (its overflow branch, which
`release_gradients` repeats), its `bit16_groups` / `bf16_groups`, and the engine's step and sample
counters. `check_supported` names whichever of them the installed DeepSpeed lacks, so that an
upgrade fails in one line instead of deep inside a step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dist_vae.errors import BackendError

SUPPORTED = "0.19"
ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")
ZERO_METHODS = ("_release_preflattened_grad_buffers", "reset_cpu_buffers", "scaled_global_norm", "zero_grad")
ZERO_FIELDS = ("micro_step_id", "cpu_offload", "averaged_gradients", "all_grad_tensors", "bit16_groups")


def _missing(obj: Any, names: tuple[str, ...], owner: str) -> list[str]:
    return [f"{owner}.{name}" for name in names if not hasattr(obj, name)]


def check_supported(zero: Any | None = None, engine: Any | None = None) -> None:
    """BackendError naming the installed and supported versions unless every private name this module
    uses is there: on the installed classes and, when given, on a ZeRO-1/2 optimizer's and an engine's
    instance fields (which exist only once they are built)."""
    import deepspeed
    from deepspeed.runtime.zero import stage_1_and_2

    absent = _missing(stage_1_and_2, ("INITIAL_MICRO_STEP_ID", "DeepSpeedZeroOptimizer"), "stage_1_and_2")
    cls = getattr(stage_1_and_2, "DeepSpeedZeroOptimizer", None)
    absent += _missing(cls, ZERO_METHODS, "DeepSpeedZeroOptimizer") if cls is not None else []
    absent += _missing(zero, ZERO_FIELDS, "DeepSpeedZeroOptimizer") if zero is not None else []
    absent += _missing(engine, ENGINE_COUNTERS, "DeepSpeedEngine") if engine is not None else []
    if absent:
        raise BackendError(
            f"deepspeed {deepspeed.__version__} lacks {', '.join(absent)}, which "
            f"dist_vae/compat/deepspeed.py uses; supported: deepspeed {SUPPORTED}.x "
            f"(install deepspeed=={SUPPORTED}.*)"
        )


def global_grad_norm(zero: Any) -> torch.Tensor:
    """What ZeRO's own step() computes first: the all-reduced norm of every rank's partition of the
    averaged gradients, unscaled; ZeRO reports a non-finite norm as -1, returned here as inf."""
    norm = zero.scaled_global_norm() / zero.loss_scale
    return torch.where(norm < 0, math.inf, norm).float()


def release_gradients(zero: Any) -> None:
    """The gradient release of ZeRO's overflow branch (stage_1_and_2.py, DeepSpeedZeroOptimizer.step):
    the gradients are dropped, weights and optimizer moments untouched."""
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

    zero.micro_step_id = INITIAL_MICRO_STEP_ID
    zero.zero_grad(set_to_none=True)
    zero._release_preflattened_grad_buffers()
    if zero.cpu_offload:
        zero.reset_cpu_buffers()
    else:
        for group in zero.averaged_gradients:
            zero.averaged_gradients[group] = None
            zero.all_grad_tensors[group] = None


def partitioned_groups(optimizer: Any) -> list[list[nn.Parameter]] | None:
    """The model parameters of each group of a ZeRO-1/2 (or bf16) optimizer, whose fp32 state is split
    over the ranks; None for an optimizer that keeps whole state."""
    groups = getattr(optimizer, "bit16_groups", None) or getattr(optimizer, "bf16_groups", None)
    return None if groups is None else [list(group) for group in groups]


def engine_counters(engine: Any) -> dict[str, int]:
    """The engine's own step/sample counters (its LR schedule and logs read them)."""
    return {name: int(getattr(engine, name)) for name in ENGINE_COUNTERS}


def restore_engine_counters(engine: Any, counters: dict[str, int]) -> None:
    for name in ENGINE_COUNTERS:
        setattr(engine, name, counters[name])
