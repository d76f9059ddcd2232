"""How one optimizer update is made on each backend, chosen once when the trainer is built.

The trainer's loop is the same everywhere: backpropagate the accumulated micro-batches, ask for the
global gradient norm, decide (engine/step.py) whether to apply the update, then `apply()` or
`discard()`. The backends differ only in how those four things are done:

- `TorchUpdate` (single process and DDP): Accelerate's `no_sync`, torch's norm and clipping, the raw
  optimizer's step. Calling the raw optimizer (not Accelerate's wrapper) keeps per-step Python work
  out of the loop. Under fp16 it drives its own `torch.amp.GradScaler` on CPU and GPU alike
  (Accelerate 1.x makes none on CPU): scale the loss, unscale before the norm, step and update.
- `DeepSpeedUpdate` (ZeRO-1/2): the engine's backward with the accumulation boundary set by us, so
  the engine never steps on its own; the ZeRO optimizer's global norm of the reduced gradient
  partitions before stepping, then either the engine's own step (which clips and steps) or the same
  gradient release ZeRO does when it drops an overflowing step. Both reach into ZeRO's private
  fields through dist_vae/compat/deepspeed.py alone. No fp16 here: it is refused under DeepSpeed
  (engine/backend.py), so no loss scaling either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from dist_vae.compat import accelerate as accelerate_compat
from dist_vae.compat import deepspeed as deepspeed_compat
from dist_vae.compat.torch_ops import TotalNorm
from dist_vae.errors import BackendError


class UpdatePath(Protocol):
    scaler: torch.amp.GradScaler | None  # the trainer's fp16 loss scaler (None under DeepSpeed)
    syncs: bool  # whether step_masked reads its flag on the host

    def accumulating(self, sync: bool) -> contextlib.AbstractContextManager[None]:
        """Context for one micro-batch's forward and backward; `sync` marks the window's last one."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the window's gradients (unscaled, identical on every rank), on device."""

    def apply(self) -> None:
        """Clip to train.grad_clip, step, clear the gradients."""

    def discard(self, nonfinite: bool) -> None:
        """Drop the gradients without touching weights or optimizer moments (a loss scaler still
        learns from a non-finite window)."""

    def step_masked(self, skip: torch.Tensor, nonfinite: torch.Tensor) -> None:
        """`apply()` where the device flag `skip` is clear, else `discard()`; decided on the device
        where the path can (no host read), on the host where it cannot (`syncs`)."""


class TorchUpdate:
    """Single process and DDP."""

    def __init__(
        self,
        acc: Accelerator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        clip: float,
        scaler: torch.amp.GradScaler | None,
    ) -> None:
        self.acc, self.model, self.optimizer, self.clip, self.scaler = acc, model, optimizer, clip, scaler
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self._norm = torch.zeros(())
        self._total_norm = TotalNorm()
        # torch's fused AdamW takes a device flag (`found_inf`) and skips the whole update with it:
        # weights, moments and step count. Other optimizers are decided on the host.
        self.syncs = not optimizer.defaults.get("fused")

    def accumulating(self, sync: bool) -> contextlib.AbstractContextManager[None]:
        # DDP decides in forward whether the backward all-reduces, so the context spans both.
        return contextlib.nullcontext() if sync else self.acc.no_sync(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss if self.scaler is None else self.scaler.scale(loss))  # / train.accumulate

    def grad_norm(self) -> torch.Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        self._norm = self._total_norm([p.grad for p in self.params if p.grad is not None])
        return self._norm.float()

    def _clip(self) -> None:
        """Scale the gradients by min(1, clip / norm): one foreach kernel. (The function takes the
        parameters, not their gradients: given gradients it finds no `.grad` and clips nothing.)"""
        if self.clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.clip, self._norm, foreach=True)

    def apply(self) -> None:
        self._clip()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step_masked(self, skip: torch.Tensor, nonfinite: torch.Tensor) -> None:
        if self.syncs:
            DeepSpeedUpdate.step_masked(self, skip, nonfinite)  # type: ignore[arg-type]
            return
        self._clip()  # a non-finite norm makes the gradients NaN: the update is skipped anyway
        self.optimizer.found_inf = skip.float()  # what GradScaler.step hands a fused optimizer
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        if self.scaler is not None:
            self.scaler.update()  # learns from unscale_'s own inf check: backs off, or counts a good step
        self.optimizer.zero_grad(set_to_none=True)

    def discard(self, nonfinite: bool) -> None:
        if self.scaler is not None:
            if nonfinite:
                self.scaler.step(self.optimizer)  # sees the inf from unscale_, skips, and...
            self.scaler.update()  # ...lowers the scale (or, after a spike, just closes this unscale_)
        self.optimizer.zero_grad(set_to_none=True)


class DeepSpeedUpdate:
    """DeepSpeed ZeRO stage 1 or 2."""

    def __init__(self, acc: Accelerator) -> None:
        # deepspeed loads only under DeepSpeed: it is slow to import and optional elsewhere.
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        self.engine = accelerate_compat.deepspeed_engine(acc)
        stage = self.engine.zero_optimization_stage()
        self.zero = self.engine.optimizer
        if stage not in (1, 2) or not isinstance(self.zero, DeepSpeedZeroOptimizer):
            raise BackendError(
                f"DeepSpeed ZeRO stage {stage} with {type(self.zero).__name__} is not supported: use "
                "zero_stage 1 or 2 (configs/accelerate/deepspeed_zero1.yaml, deepspeed_zero2.yaml)"
            )
        deepspeed_compat.check_supported(self.zero, self.engine)
        self.syncs = True  # ZeRO's step reads its overflow flag on the host: so does the decision
        self.scaler: torch.amp.GradScaler | None = None

    @contextlib.contextmanager
    def accumulating(self, sync: bool) -> Iterator[None]:
        self.engine.set_gradient_accumulation_boundary(sync)  # reduce (and allow a step) only on sync
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # divides by gradient_accumulation_steps

    def grad_norm(self) -> torch.Tensor:
        return deepspeed_compat.global_grad_norm(self.zero)

    def apply(self) -> None:
        self.engine.step()

    def step_masked(self, skip: torch.Tensor, nonfinite: torch.Tensor) -> None:
        if bool(skip):
            self.discard(bool(nonfinite))
        else:
            self.apply()

    def discard(self, nonfinite: bool) -> None:
        deepspeed_compat.release_gradients(self.zero)  # the gradient release of ZeRO's overflow branch


def make_update_path(
    acc: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    clip: float,
    loss_scale_growth: int | None,
) -> UpdatePath:
    """`model` as prepared by Accelerate, `optimizer` the raw torch one it wraps. `loss_scale_growth`:
    under fp16, the updates without overflow after which the loss scale doubles; None without fp16."""
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeedUpdate(acc)
    scaler = None
    if loss_scale_growth is not None:
        scaler = torch.amp.GradScaler(acc.device.type, growth_interval=loss_scale_growth)
    return TorchUpdate(acc, model, optimizer, clip, scaler)
