"""Whole, world-size independent model and optimizer state, whatever the backend.

DDP (and a single process) keeps the full state on every rank. DeepSpeed ZeRO-1/2 partitions the
fp32 master weights and the optimizer moments over the ranks; DeepSpeed's `safe_get_full_*` and
`safe_set_full_*` assemble and scatter them one parameter at a time (the getters are collectives:
every rank calls them in the same order). Optimizer state is keyed by parameter name
(`exp_avg/<name>`), so a checkpoint loads on any world size and on either backend.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from torch import nn

from dist_vae.checkpoint.format import load_module_state
from dist_vae.compat import deepspeed as deepspeed_compat
from dist_vae.errors import BackendError, CheckpointError

Tensors = dict[str, torch.Tensor]


class AveragedWeights(Protocol):
    """What a checkpoint keeps of an average of the weights (engine/backend.py's EMA): tensors, and the
    decay and update count as JSON."""

    decay: float
    updates: int

    def state_dict(self) -> Tensors: ...

    def load_state_dict(self, tensors: Tensors, updates: int) -> None: ...


def as_deepspeed_engine(model: nn.Module) -> Any | None:
    """The DeepSpeed engine when `model` is one (deepspeed is imported only by runs that use it)."""
    ds = sys.modules.get("deepspeed")
    return model if ds is not None and isinstance(model, ds.DeepSpeedEngine) else None


def raw_module(model: nn.Module) -> nn.Module:
    """The model inside its DeepSpeed or DDP wrapper (compile works in place, so nothing else wraps
    it). Not `Accelerator.unwrap_model`: that imports deepspeed whenever it is installed, over a
    second at every process start of runs that never use it."""
    engine = as_deepspeed_engine(model)
    if engine is not None:
        return engine.module
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _partitioned(model: nn.Module) -> list[list[nn.Parameter]] | None:
    """The parameter groups of DeepSpeed's ZeRO-1/2 (or bf16) optimizer, whose fp32 state is split
    over the ranks, else None."""
    engine = as_deepspeed_engine(model)
    if engine is None:
        return None
    if engine.zero_optimization_stage() > 2:
        raise BackendError("checkpoints support DeepSpeed ZeRO stages 0-2, not stage 3")
    return deepspeed_compat.partitioned_groups(engine.optimizer)


def _torch_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer holding the state (under ZeRO: over the flat fp32 partitions)."""
    engine = as_deepspeed_engine(model)
    inner = engine.optimizer if engine is not None else optimizer
    while isinstance(inner, AcceleratedOptimizer) or not isinstance(inner, torch.optim.Optimizer):
        inner = inner.optimizer
    return inner


def _groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[nn.Parameter]]:
    """The model parameters of each optimizer group, in the optimizer's order."""
    zero = _partitioned(model)
    if zero is not None:
        return zero
    return [list(group["params"]) for group in _torch_optimizer(model, optimizer).param_groups]


def _cpu(tensors: Tensors) -> Tensors:
    return {name: value.detach().cpu().contiguous().clone() for name, value in tensors.items()}


def full_weights(acc: Accelerator, model: nn.Module) -> Tensors:
    """The raw module's state dict, parameters as their fp32 master copy (a collective under ZeRO)."""
    module = raw_module(model)
    state = dict(module.state_dict())
    if _partitioned(model) is not None:
        from deepspeed.utils import safe_get_full_fp32_param

        for name, param in module.named_parameters():
            full = safe_get_full_fp32_param(param)
            if full is not None:
                state[name] = full
    return _cpu(state)


def load_weights(acc: Accelerator, model: nn.Module, tensors: Tensors, source: Path) -> None:
    module = raw_module(model)
    load_module_state(module, tensors, source)
    if _partitioned(model) is not None:
        from deepspeed.utils import safe_set_full_fp32_param

        for name, param in module.named_parameters():
            safe_set_full_fp32_param(param, tensors[name].to(param.device))


# How torch computes an update, not which update: this process's choice stands (a run saved before
# the trainer used the fused AdamW, or saved on another kind of device, resumes on this one's kernel).
IMPLEMENTATION_SWITCHES = ("foreach", "fused", "capturable", "differentiable")
# Set from this run's config (engine/backend.py's make_optimizer; the LR again at every step), not the
# checkpoint's: a resume with a changed train.weight_decay, which it announces, trains with it.
CONFIGURED = ("lr", "weight_decay")


def _hyperparameters(group: dict[str, Any], index: int) -> dict[str, Any]:
    hyper = {}
    for key, value in group.items():
        value = list(value) if isinstance(value, tuple) else value
        if key != "params" and not isinstance(value, (int, float, bool, str, list, type(None))):
            raise TypeError(f"optimizer group {index}: hyperparameter {key!r} is a {type(value).__name__}")
        if key != "params":
            hyper[key] = value
    return hyper


def optimizer_state(
    acc: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[Tensors, dict[str, Any]]:
    """Tensors named `key/parameter`, and JSON: per group its parameter names, state keys and
    hyperparameters. A collective under ZeRO."""
    names = {id(p): n for n, p in raw_module(model).named_parameters()}
    inner, zero = _torch_optimizer(model, optimizer), _partitioned(model)
    tensors: Tensors = {}
    groups = []
    for index, (group, params) in enumerate(zip(inner.param_groups, _groups(model, optimizer), strict=True)):
        keys: list[str] = []
        if zero is not None:
            from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_get_full_optimizer_state

            flat = group["params"][0]
            local = inner.state.get(flat, {})
            keys = sorted(k for k, v in local.items() if torch.is_tensor(v) and v.shape == flat.shape)
            # DeepSpeed links parameters to their state views once, right after the first group's
            # first step, so later groups would have none: link this group's again (idempotent).
            lazy_init_hp_params_optimizer_state(params, flat, inner.state)
            for param in params:
                for key in keys:
                    tensors[f"{key}/{names[id(param)]}"] = safe_get_full_optimizer_state(param, key)
                if "step" in local:  # one count per flat group: Adam's bias correction continues from it
                    tensors[f"step/{names[id(param)]}"] = torch.as_tensor(local["step"])
            keys += ["step"] if "step" in local else []
        else:
            for param in params:
                for key, value in inner.state.get(param, {}).items():
                    if not torch.is_tensor(value):
                        raise TypeError(f"optimizer state {key!r} of {names[id(param)]} is not a tensor")
                    tensors[f"{key}/{names[id(param)]}"] = value
                    keys += [] if key in keys else [key]
        hyper = _hyperparameters(group, index)
        groups.append({"params": [names[id(p)] for p in params], "state": keys, **hyper})
    return _cpu(tensors), {"groups": groups}


def _saved(tensors: Tensors, keys: list[str], name: str) -> Tensors:
    """The saved state of parameter `name` (empty when it had none, e.g. it never had a gradient)."""
    return {key: tensors[f"{key}/{name}"] for key in keys if f"{key}/{name}" in tensors}


def load_optimizer_state(
    acc: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tensors: Tensors,
    meta: dict[str, Any],
    source: Path,
) -> None:
    """Restore what `optimizer_state` saved, on this run's world size and backend."""
    names = {id(p): n for n, p in raw_module(model).named_parameters()}
    inner, zero, groups = _torch_optimizer(model, optimizer), _partitioned(model), _groups(model, optimizer)
    saved = meta["groups"]
    for index in range(max(len(groups), len(saved))):
        have = {names[id(p)] for p in groups[index]} if index < len(groups) else set()
        want = set(saved[index]["params"]) if index < len(saved) else set()
        if have != want:
            raise CheckpointError(
                f"{source}: optimizer group {index} held parameters {sorted(want ^ have)[:3]} differently "
                "from this model (was the model configuration changed?)"
            )
    for group, entry in zip(inner.param_groups, saved, strict=True):
        for key, value in entry.items():
            if key not in ("params", "state", *IMPLEMENTATION_SWITCHES, *CONFIGURED):
                group[key] = tuple(value) if isinstance(group.get(key), tuple) else value
    if zero is not None:
        for group, params, entry in zip(inner.param_groups, groups, saved, strict=True):
            per_param = [_saved(tensors, entry["state"], names[id(p)]) for p in params]
            if entry["state"]:
                _load_partition(inner, group, params, per_param, source)
        return
    per_param = [
        _saved(tensors, entry["state"], names[id(p)])
        for params, entry in zip(groups, saved, strict=True)
        for p in params
    ]
    state = inner.state_dict()  # the torch layout: parameters numbered in group order
    state["state"] = {index: found for index, found in enumerate(per_param) if found}
    inner.load_state_dict(state)


def _load_partition(
    inner: torch.optim.Optimizer,
    group: dict[str, Any],
    params: list[nn.Parameter],
    per_param: list[Tensors],
    source: Path,
) -> None:
    """Fill one ZeRO param `group`'s flat state (created here when this engine has not stepped yet)
    through DeepSpeed's per-parameter setters. The step count goes where torch's own
    Optimizer.load_state_dict puts it: a fused or capturable AdamW's kernel reads it in device memory
    as float32, so it moves to the flat parameter's device there; elsewhere it stays on the CPU."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_set_full_optimizer_state

    steps = {float(saved["step"]) for saved in per_param if "step" in saved}
    if len(steps) > 1:
        raise CheckpointError(f"{source}: one optimizer group's parameters have step counts {sorted(steps)}; "
                          "ZeRO keeps one count per group")  # fmt: skip
    flat = group["params"][0]
    fused = bool(group.get("fused") or group.get("capturable"))
    state = inner.state[flat]
    for saved in per_param:
        for key, value in saved.items():
            if key == "step":
                state["step"] = value.to(flat.device, torch.float32, copy=True) if fused else value.clone()
            elif key not in state:
                state[key] = torch.zeros_like(flat)
    lazy_init_hp_params_optimizer_state(params, flat, inner.state)
    for param, saved in zip(params, per_param, strict=True):
        for key, value in saved.items():
            if key != "step":
                safe_set_full_optimizer_state(param, value.to(flat.device), key)


def engine_counters(model: nn.Module) -> dict[str, int] | None:
    """DeepSpeed's own step/sample counters (its LR schedule and logs read them)."""
    engine = as_deepspeed_engine(model)
    return None if engine is None else deepspeed_compat.engine_counters(engine)


def restore_engine_counters(model: nn.Module, counters: dict[str, int] | None) -> None:
    engine = as_deepspeed_engine(model)
    if engine is not None and counters:
        deepspeed_compat.restore_engine_counters(engine, counters)


def scaler_state(scaler: torch.amp.GradScaler | None) -> dict[str, Any] | None:
    """The trainer's fp16 loss scale and its growth tracking (DDP or one process: fp16 is refused
    under DeepSpeed). Every rank holds the same (its overflow check reads the all-reduced gradients),
    so it is global."""
    return scaler.state_dict() if scaler is not None else None


def restore_scaler(scaler: torch.amp.GradScaler | None, state: dict[str, Any] | None) -> None:
    """Continue the saved scale and growth tracker under this run's configured hyperparameters (a
    tracker past a shortened interval grows the scale at the next clean update). A state without a
    GradScaler's `scale` is ignored: bf16 and fp32 ZeRO checkpoints hold DeepSpeed's static scaler,
    `{"cur_scale": 1.0}`, which says nothing about fp16."""
    if scaler is None or state is None or "scale" not in state:
        return
    tracker = min(int(state.get("_growth_tracker", 0)), scaler.get_growth_interval() - 1)
    scaler.load_state_dict(
        {**scaler.state_dict(), "scale": float(state["scale"]), "_growth_tracker": tracker}
    )
