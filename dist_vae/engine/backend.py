"""The model and optimizer as the launcher's backend runs them (DDP, DeepSpeed or one process).

One optimizer holds one parameter group per name in `model.param_groups()` ('main', and 'critic'
for the adversarial PixelVAE), so the loss is backpropagated once through one wrapped model, which
is all DeepSpeed allows. How an update is made is the backend's (engine/update.py, chosen once here).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import distributed as dist
from torch import nn

from dist_vae.config import Config, ConfigError
from dist_vae.engine.distributed import make_accelerator
from dist_vae.engine.ema import EMA
from dist_vae.engine.update import UpdatePath, make_update_path
from dist_vae.flops import flops_per_image, peak_flops
from dist_vae.host_memory import return_large_blocks_to_os
from dist_vae.models import build_model

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# Where torch has a fused AdamW kernel: one pass over each parameter instead of about ten operators
# (configs/demo_iterative.yaml on this project's 2-core CPU: 30 -> 6 ms of a ~430 ms step).
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with one group per model group name, each at its configured LR; torch's fused kernel
    where every parameter's device has one (the same update, rounded in a different order)."""
    lrs = {"main": cfg.train.lr, "critic": cfg.train.critic_lr}
    groups = model.param_groups()
    unknown = sorted(set(groups) - set(lrs))
    if unknown:
        raise ConfigError(f"model parameter groups {unknown} have no learning rate; known: {sorted(lrs)}")
    listed = [id(p) for params in groups.values() for p in params]
    if len(listed) != len(set(listed)) or set(listed) != {id(p) for p in model.parameters()}:
        raise ValueError(f"{type(model).__name__}.param_groups() must list every parameter exactly once")
    fused = all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in model.parameters())
    return torch.optim.AdamW(
        [{"params": params, "lr": lrs[name]} for name, params in groups.items()],
        weight_decay=cfg.train.weight_decay,
        fused=fused or None,
    )


def start_accelerator(cfg: Config, world_size: int) -> Accelerator:
    """The Accelerator, refused when it does not see the `world_size` processes the launcher started."""
    acc = make_accelerator(cfg)
    if acc.device.type == "cpu":
        return_large_blocks_to_os()  # the activations live in host memory (host_memory.py)
    if acc.num_processes != world_size:
        raise ConfigError(f"Accelerate sees {acc.num_processes} processes but WORLD_SIZE is {world_size}")
    return acc


def agree(acc: Accelerator, values: list[torch.Tensor]) -> list[float]:
    """Every rank's maximum of each value, read on the host: a step's one device read."""
    votes = torch.stack([v.float().reshape(()) for v in values])
    if acc.num_processes > 1:
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return votes.tolist()


def sum_over_ranks(acc: Accelerator, counts: list[int]) -> list[int]:
    """Integer counts summed over every rank (collective)."""
    total = torch.tensor(counts, device=acc.device)
    if acc.num_processes > 1:
        dist.all_reduce(total)
    return total.tolist()


@dataclass
class Backend:
    """What an update touches: the prepared model and optimizer, the update path, the EMA."""

    accelerator: Accelerator
    model: nn.Module  # as prepared (DDP or DeepSpeed engine around it)
    raw_model: nn.Module
    optimizer: torch.optim.Optimizer  # as prepared
    update_path: UpdatePath
    ema: EMA | None
    group_names: list[str]
    base_lrs: list[float]  # configured LRs times the resize's scale
    peak_flops: float | None  # perf/mfu's denominator; None when unknown (no perf/mfu logged)
    flops_per_image: float

    @property
    def eval_model(self) -> nn.Module:
        """The weights evaluation and samples use: the EMA's when kept."""
        return self.ema.model if self.ema is not None else self.raw_model

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """The forwards' mixed precision: fp16 autocast where the trainer owns the loss scaler (and so
        the autocast: engine/distributed.py), else Accelerate's (bf16, or none)."""
        if self.update_path.scaler is not None:
            return torch.autocast(self.accelerator.device.type, dtype=torch.float16)
        return self.accelerator.autocast()

    def set_lr(self, factor: float) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor


def compiles_before_wrap(cfg: Config, device: torch.device) -> bool:
    """train.compile=on, or auto on a GPU (where compiling pays back quickly); auto elsewhere is decided
    once the first steps are timed (engine/compile_choice.py)."""
    return cfg.train.compile == "on" or (cfg.train.compile == "auto" and device.type == "cuda")


def build_backend(cfg: Config, acc: Accelerator, lr_scale: float) -> Backend:
    """Identical initial weights on every rank, counted (FLOPs) and compiled before they are wrapped."""
    t = cfg.train
    set_seed(cfg.seed)
    model = build_model(cfg.model, cfg.data.resolution, t.gradient_checkpointing)
    group_names = list(model.param_groups())
    optimizer = make_optimizer(model, cfg)
    base_lrs = [group["lr"] * lr_scale for group in optimizer.param_groups]
    ema = EMA(model, t.ema_decay, acc.device) if t.ema_decay > 0 else None
    # perf/mfu's numerator, counted once on fake tensors (seconds) before compile and wrapping.
    peak = peak_flops(acc.device, _DTYPES[t.precision], t.peak_flops)
    per_image = flops_per_image(model, cfg.data.resolution) if peak else 0.0
    if compiles_before_wrap(cfg, acc.device):
        if t.compile == "auto" and acc.is_main_process:
            print("train.compile=auto on a GPU: compile", file=sys.stderr, flush=True)
        model.compile()  # in place: parameter names, checkpoints and param_groups() stay as they are
    prepared, prepared_optimizer = acc.prepare(model, optimizer)
    raw_model = acc.unwrap_model(prepared)
    growth = t.loss_scale_growth_interval if t.precision == "fp16" else None
    update_path = make_update_path(acc, prepared, optimizer, t.grad_clip, growth)  # the raw optimizer
    return Backend(
        acc, prepared, raw_model, prepared_optimizer, update_path, ema, group_names, base_lrs, peak, per_image
    )
