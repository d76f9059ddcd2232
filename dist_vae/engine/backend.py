"""The Accelerator (DDP, DeepSpeed or one process, as the accelerate config file says) and what an
update touches: the model, the optimizer, the EMA and the update path (engine/update.py).

One optimizer holds one parameter group per name in `model.param_groups()` ('main', and 'critic'
for the adversarial PixelVAE), so the loss is backpropagated once through one wrapped model, which
is all DeepSpeed allows.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_vae.checkpoint import raw_module
from dist_vae.compat.torch_ops import copy_all_, lerp_all_
from dist_vae.config import Config, ConfigError, TrainConfig
from dist_vae.distributed import needs_gloo
from dist_vae.engine.update import UpdatePath, make_update_path
from dist_vae.errors import BackendError
from dist_vae.flops import flops_per_image, peak_flops
from dist_vae.host_memory import return_large_blocks_to_os
from dist_vae.models import build_model
from dist_vae.precision import DTYPES
from dist_vae.step_time import flops_and_operations, host_bound_warning

# Where torch has a fused AdamW kernel: one pass over each parameter instead of about ten operators.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


# Refused before the Accelerator exists: DeepSpeed's fp16 mode casts the weights and nothing else, so
# the models' fp32 buffers (iterative_nets.py's `fold`, used where autocast is off) meet fp16 weights
# in the first forward, whose matmul raises.
DEEPSPEED_FP16 = (
    "bad value 'fp16' for 'train.precision' under DeepSpeed: DeepSpeed's fp16 mode casts the weights to "
    "fp16, which these models' fp32 buffers do not meet; use bf16 (the LSUN configs' precision) with "
    "DeepSpeed, or fp16 with DDP (configs/accelerate/ddp.yaml) or one process"
)


def own_autocast(precision: str, deepspeed: bool) -> torch.dtype | None:
    """The dtype of the autocast the trainer runs itself (Backend.autocast); None: Accelerate's (bf16
    outside DeepSpeed) or none. fp16: Accelerate 1.x makes no GradScaler and no autocast on the CPU
    (it would silently train fp32), so the trainer owns both everywhere (update.py). bf16: DeepSpeed's
    casts the weights, which then meet the models' fp32 inputs and buffers; the trainer's autocast over
    fp32 weights is what bf16 is under DDP too."""
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" and deepspeed:
        return torch.bfloat16
    return None


def make_accelerator(cfg: Config) -> Accelerator:
    # Without a GPU, Accelerate needs cpu=True to treat torchrun's processes as MULTI_CPU (else it
    # reports DistributedType.NO and nothing is wrapped in DDP), but cpu=True also turns DeepSpeed
    # off, which handles CPU by itself. Either way the backend must be gloo, not MPI.
    t = cfg.train
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and t.precision == "fp16":
        raise ConfigError(DEEPSPEED_FP16)
    cpu = not torch.cuda.is_available() and not deepspeed
    # Accelerate's mixed precision only where the trainer runs no autocast of its own: under DeepSpeed
    # the weights and ZeRO's reduced gradients then stay fp32.
    precision = "no" if t.precision == "fp32" or own_autocast(t.precision, deepspeed) else t.precision
    # The timeout ends a collective whose peer died or hangs (DeepSpeed's init_distributed gets it too).
    timeout = timedelta(seconds=t.collective_timeout)
    group = InitProcessGroupKwargs(timeout=timeout, **({"backend": "gloo"} if needs_gloo() else {}))
    try:
        accelerator = Accelerator(cpu=cpu, mixed_precision=precision, kwargs_handlers=[group])
    except torch.distributed.DistError as exc:  # a rank that never joined: one line, not a traceback
        key = f"train.collective_timeout={t.collective_timeout:g}"
        raise BackendError(
            f"the process group did not form within {key} s ({str(exc).splitlines()[0]}); check that "
            "every rank started and MASTER_ADDR:MASTER_PORT is reachable from all of them"
        ) from exc
    # The launcher's environment may carry its own accumulation count; the run config decides.
    accelerator.gradient_accumulation_steps = t.accumulate
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        ds["gradient_accumulation_steps"] = t.accumulate
        ds["gradient_clipping"] = t.grad_clip
        ds["steps_per_print"] = 2**31 - 1  # the progress bar and TensorBoard are the only per-step output
    return accelerator


def start_accelerator(cfg: Config, world_size: int) -> Accelerator:
    """The Accelerator, refused when it does not see the `world_size` processes the launcher started."""
    acc = make_accelerator(cfg)
    if acc.device.type == "cpu":
        return_large_blocks_to_os()  # the activations live in host memory (host_memory.py)
    if acc.num_processes != world_size:
        raise ConfigError(f"Accelerate sees {acc.num_processes} processes but WORLD_SIZE is {world_size}")
    return acc


def spare_buffer_broadcasts(prepared: nn.Module) -> None:
    """DDP broadcasts rank 0's buffers before every forward, one collective per micro-batch, which
    only state that changes in training needs, and such state is checkpointed (a persistent buffer:
    running statistics). Constants each rank builds alike (non-persistent: iterative_nets.py's `fold`)
    are not sent. Set on the wrapper, the broadcast at construction stays; the keyword
    `broadcast_buffers=False` (deprecated since torch 2.13) would skip that too."""
    if isinstance(prepared, DistributedDataParallel):
        model = prepared.module
        prepared.broadcast_buffers = bool(
            {name for name, _ in model.named_buffers()} & set(model.state_dict())
        )


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


class EMA:
    """A frozen fp32 copy of `model` whose weights trail the trained ones, a few foreach kernels per
    update. The effective decay is min(decay, (1 + n) / (10 + n)) after n updates, so early in training
    the average is not dominated by the random initialisation. Built before the model is compiled or
    wrapped (the copy must not share a compiled forward), it follows the parameter objects, which DDP
    and DeepSpeed keep; moving the model to the GPU replaces its buffers: `follow` it after prepare.
    """

    def __init__(self, model: nn.Module, decay: float, device: torch.device | str = "cpu") -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False).to(device)
        self._shadow = (list(self.model.parameters()), list(self.model.buffers()))
        self._updates = torch.zeros((), dtype=torch.long, device=device)
        self.follow(model)

    def follow(self, model: nn.Module) -> None:
        """Average `model`'s parameters and buffers as they are now (again once prepare has moved it)."""
        self._source = (list(model.parameters()), list(model.buffers()))

    @torch.no_grad()
    def update(self, applied: torch.Tensor | None = None) -> None:
        """Move the average towards the weights; `applied` (a device flag): only where it is set, so a
        skipped update is masked on the device rather than decided on the host."""
        if applied is None:
            applied = torch.ones((), dtype=torch.bool, device=self._updates.device)
        self._updates.add_(applied.long())
        n = self._updates.double()
        decay = ((1 + n) / (10 + n)).clamp(max=self.decay)
        weight = torch.where(applied, 1.0 - decay, 0.0).float()
        (params, buffers), (shadow, shadow_buffers) = self._source, self._shadow
        # The parameters themselves where float32 (read under no_grad: a detach each would be one more
        # host operation per parameter); the others' float32 copies.
        fp32 = all(p.dtype == torch.float32 for p in params)
        lerp_all_(shadow, params if fp32 else [p.detach().float() for p in params], weight)
        if buffers:
            kept = [torch.where(applied, b, s) for b, s in zip(buffers, shadow_buffers, strict=True)]
            copy_all_(shadow_buffers, kept)

    @property
    def updates(self) -> int:
        """Updates averaged so far (reads the device: checkpoint steps)."""
        return int(self._updates)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only; `decay` and `updates` are plain numbers the checkpoint keeps as JSON."""
        return self.model.state_dict()

    def load_state_dict(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        self._updates.fill_(updates)
        self.model.load_state_dict(tensors)


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
    autocast_dtype: torch.dtype | None  # the trainer's own autocast (own_autocast), else None

    @property
    def eval_model(self) -> nn.Module:
        """The weights evaluation and samples use: the EMA's when kept."""
        return self.ema.model if self.ema is not None else self.raw_model

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """The forwards' mixed precision: the trainer's own autocast where it runs one (fp16
        everywhere, bf16 under DeepSpeed: `own_autocast`), else Accelerate's (bf16, or none)."""
        if self.autocast_dtype is not None:
            return torch.autocast(self.accelerator.device.type, dtype=self.autocast_dtype)
        return self.accelerator.autocast()

    def set_lr(self, factor: float) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor


def compiles(train: TrainConfig, device: torch.device) -> bool:
    """train.compile: `on` anywhere, `auto` on a GPU only (on the CPU compiling takes minutes and pays
    back on long runs alone), `off` never."""
    return train.compile == "on" or (train.compile == "auto" and device.type == "cuda")


def cuda_graphs_refusal(device_type: str, deepspeed: bool, accumulate: int) -> str | None:
    """Why train.cuda_graphs=true cannot run here, or None. It is torch.compile's "reduce-overhead"
    mode, which keeps gradient checkpointing's recomputation and DDP's bucketed all-reduce outside the
    graphs it captures, copies each batch into its own static input buffers and replays the forward
    and the backward without the host. Refused without a GPU; under DeepSpeed, whose engine steps and
    reduces outside torch.compile's view; and with more than one micro-batch per update (the effective
    `accumulate`, after a resize), because the first micro-batch's gradients become `.grad` in the
    graph's memory and the next replay overwrites them."""
    if device_type != "cuda":
        return "train.cuda_graphs=true needs a GPU, and this run has none: set it to false"
    if deepspeed:
        return (
            "train.cuda_graphs=true is not supported under DeepSpeed: use configs/accelerate/ddp.yaml or "
            "set train.cuda_graphs=false"
        )
    if accumulate > 1:
        return (
            f"train.cuda_graphs=true needs train.accumulate=1 (this run has {accumulate}): captured graphs "
            "overwrite the gradients one micro-batch leaves for the next; set train.cuda_graphs=false, or "
            "train.resize=scale_lr where a resize raised the accumulation"
        )
    return None


def warn_if_host_bound(model: nn.Module, cfg: Config, peak: float) -> None:
    """One line at start-up when the step is predicted host-bound (dist_vae/step_time.py)."""
    flops, operations = flops_and_operations(model, cfg.data.resolution)
    compiled = compiles(cfg.train, torch.device("cuda"))
    mode = "graphed" if cfg.train.cuda_graphs else "compiled" if compiled else "eager"
    line = host_bound_warning(operations, flops, cfg.data.batch_size, peak, mode)
    if line:
        print(line, file=sys.stderr, flush=True)


def build_backend(cfg: Config, world_size: int, lr_scale: float) -> Backend:
    """The Accelerator for the `world_size` processes the launcher started, and identical initial
    weights on every rank, counted (FLOPs) and compiled before they are wrapped."""
    t = cfg.train
    acc = start_accelerator(cfg, world_size)
    set_seed(cfg.seed)
    model = build_model(cfg.model, cfg.data.resolution, t.gradient_checkpointing)
    group_names = list(model.param_groups())
    optimizer = make_optimizer(model, cfg)
    base_lrs = [group["lr"] * lr_scale for group in optimizer.param_groups]
    ema = EMA(model, t.ema_decay, acc.device) if t.ema_decay > 0 else None
    # perf/mfu's numerator, counted once on fake tensors before compile and wrapping.
    peak = peak_flops(acc.device, DTYPES[t.precision], t.peak_flops)
    per_image = flops_per_image(model, cfg.data.resolution) if peak else 0.0
    if peak and acc.device.type == "cuda" and acc.is_main_process:  # on a GPU only
        warn_if_host_bound(model, cfg, peak)
    deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
    if t.cuda_graphs:
        refusal = cuda_graphs_refusal(acc.device.type, deepspeed, t.accumulate)
        if refusal:
            raise BackendError(refusal)
        model.compile(mode="reduce-overhead")  # CUDA graphs through inductor's cudagraph trees
    elif compiles(t, acc.device):
        if t.compile == "auto" and acc.is_main_process:
            print("train.compile=auto on a GPU: compile", file=sys.stderr, flush=True)
        model.compile()  # in place: parameter names, checkpoints and param_groups() stay as they are
    prepared, prepared_optimizer = acc.prepare(model, optimizer)
    spare_buffer_broadcasts(prepared)
    raw_model = raw_module(prepared)
    if ema is not None:  # prepare moved the model to the device: its buffers are new tensors
        ema.follow(raw_model)
    growth = t.loss_scale_growth_interval if t.precision == "fp16" else None
    update_path = make_update_path(acc, prepared, optimizer, t.grad_clip, growth)  # the raw optimizer
    return Backend(
        acc, prepared, raw_model, prepared_optimizer, update_path, ema, group_names, base_lrs, peak,
        per_image, own_autocast(t.precision, deepspeed),
    )  # fmt: skip
