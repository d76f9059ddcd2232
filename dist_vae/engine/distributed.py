"""The trainer's Accelerator: DDP, DeepSpeed or a single process, as the accelerate config file says."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from dist_vae.config import Config, ConfigError
from dist_vae.errors import BackendError
from dist_vae.processes import needs_gloo


def check_deepspeed_fp16() -> None:
    """ConfigError in one line where DeepSpeed cannot run fp16 (its CPU accelerator has no fp16),
    before DeepSpeed fails at its first step with a ValueError."""
    from deepspeed.accelerator import get_accelerator

    found = get_accelerator()
    if not found.is_fp16_supported():
        raise ConfigError(
            f"bad value 'fp16' for 'train.precision' under DeepSpeed: DeepSpeed's {found.device_name()} "
            "accelerator has no fp16; use bf16 or fp32 with DeepSpeed there, or fp16 with DDP or one "
            "process (configs/accelerate/cpu_debug.yaml)"
        )


def make_accelerator(cfg: Config) -> Accelerator:
    # Without a GPU, Accelerate needs cpu=True to treat torchrun's processes as MULTI_CPU (else it
    # reports DistributedType.NO and nothing is wrapped in DDP), but cpu=True also turns DeepSpeed
    # off, which handles CPU by itself. Either way the backend must be gloo, not MPI.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and cfg.train.precision == "fp16":
        check_deepspeed_fp16()
    cpu = not torch.cuda.is_available() and not deepspeed
    # fp16 goes to Accelerate only under DeepSpeed, whose fp16 optimizer keeps its own loss scaler.
    # Elsewhere Accelerate 1.x makes no GradScaler and no autocast on CPU (it would silently train
    # fp32), so the trainer owns both on every device (Backend.autocast, update.py's TorchUpdate).
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16" if deepspeed else "no"}[cfg.train.precision]
    # The timeout ends a collective whose peer died or hangs (DeepSpeed's init_distributed gets it too).
    timeout = timedelta(seconds=cfg.train.collective_timeout)
    group = InitProcessGroupKwargs(timeout=timeout, **({"backend": "gloo"} if needs_gloo() else {}))
    try:
        accelerator = Accelerator(cpu=cpu, mixed_precision=precision, kwargs_handlers=[group])
    except torch.distributed.DistError as exc:  # a rank that never joined: one line, not a traceback
        key = f"train.collective_timeout={cfg.train.collective_timeout:g}"
        raise BackendError(
            f"the process group did not form within {key} s ({str(exc).splitlines()[0]}); check that "
            "every rank started and MASTER_ADDR:MASTER_PORT is reachable from all of them"
        ) from exc
    # The launcher's environment may carry its own accumulation count; the run config decides.
    accelerator.gradient_accumulation_steps = cfg.train.accumulate
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        ds["gradient_accumulation_steps"] = cfg.train.accumulate
        ds["gradient_clipping"] = cfg.train.grad_clip
        ds["steps_per_print"] = 2**31 - 1  # the progress bar and TensorBoard are the only per-step output
        if ds.get("fp16", {}).get("enabled"):
            ds["fp16"]["loss_scale_window"] = cfg.train.loss_scale_growth_interval
    return accelerator
