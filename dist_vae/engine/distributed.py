"""Process groups: the trainer's Accelerator, and the tools' (sampling, evaluation): one process, or
several from `accelerate launch` / torchrun, each taking a share of the work and gathering the results
on the main process."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from dist_vae.config import Config, ConfigError

_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


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


def make_accelerator(cfg: Config) -> Accelerator:
    # Without a GPU, Accelerate needs cpu=True to treat torchrun's processes as MULTI_CPU (else it
    # reports DistributedType.NO and nothing is wrapped in DDP), but cpu=True also turns DeepSpeed
    # off, which handles CPU by itself. Either way the backend must be gloo, not MPI.
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        # Accelerate would silently run fp32 (no loss scaler) on CPU.
        raise ConfigError("bad value 'fp16' for 'train.precision': fp16 needs a GPU; use bf16 or fp32 on CPU")
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    cpu = not torch.cuda.is_available() and not deepspeed
    handlers = [InitProcessGroupKwargs(backend="gloo")] if needs_gloo() else []
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=_PRECISION[cfg.train.precision], kwargs_handlers=handlers
    )
    # The launcher's environment may carry its own accumulation count; the run config decides.
    accelerator.gradient_accumulation_steps = cfg.train.accumulate
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        ds["gradient_accumulation_steps"] = cfg.train.accumulate
        ds["gradient_clipping"] = cfg.train.grad_clip
        ds["steps_per_print"] = 2**31 - 1  # the progress bar and TensorBoard are the only per-step output
    return accelerator
