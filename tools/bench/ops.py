"""Benchmark: aten operations per training step for each shipped config, by module, and the host floor.

    PYTHONPATH=. python tools/bench/ops.py [--configs configs/a.yaml ...] [--resolution R] [--batch B]
                                           [--checkpointing config|on|off] [--optimizer] [--no-floor]

On a GPU in eager mode every operation is a kernel launch the host must issue, so when a step's
arithmetic is small the step costs (operations x host time per operation), whatever the batch: the
host floor. This prints what that floor is made of.

`aten ops`: the number of aten operator calls torch.profiler records (record_shapes=False) over one
forward of `model(x, step)` and one backward of its total loss, after a warm-up step: every event
whose name starts with "aten::", top-level and nested (`conv2d` -> `convolution` -> `_convolution` ->
the backend's kernel counts as four), the forward recomputed by gradient checkpointing included. The
nested ops are the backend's (here the CPU's): the count is comparable between trees on one machine
kind, not across them. One exception: a multi-tensor operation (`aten::_foreach_*`, `aten::_fused_*`:
the update's norm, clipping, AdamW and EMA) counts once, without what it calls. On the CPU those
kernels loop over the tensors and dispatch per-tensor operations (the fused AdamW about eight per
parameter); on a GPU the host dispatches the operation once and it launches one multi-tensor kernel
per chunk of tensors. `events` counts them too. `convs`: `aten::convolution` plus
`aten::convolution_backward` calls. `traced`: the operations torch.compile would trace (dispatched
below autograd, on fake tensors, no nesting, no recomputation;
`dist_vae.step_time.flops_and_operations`). `--optimizer` adds the trainer's update after the
backward, counted apart: the engine's own `UpdateStep.decide` on the backend `build_backend` makes
(fp32, one process): gradient norm, skip decision, clipping, masked fused AdamW, EMA, zero_grad.

Attribution: every module whose path has at most --depth names (indices collapsed to `*`) opens a
profiler scope around its forward; a forward op belongs to its innermost scope, and a backward op to
the scope of the forward op that created its autograd node (matched by sequence number). `(model)`
is the model's own forward outside those modules (the loss terms), `(AccumulateGrad)` the one op per
parameter that hands autograd's gradient to `.grad`, `(autograd)` backward work matched to no
forward scope: the seed gradient and the backward of custom autograd functions (whose forward
records no sequence number), such as the models' fused ops.

Host floor: the same step with the arithmetic shrunk (every width field of the model's config set
to --floor-width, same resolution, batch 1), timed (fastest of --floor-steps after a warm-up), with
its own op count: seconds per step and microseconds per operation. Both columns come from the
shrunk model, which takes the CPU's small-tensor kernels (a few more nested ops each).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from dist_vae.config import load_config
from dist_vae.engine.backend import build_backend
from dist_vae.engine.step import UpdateStep, make_gate
from dist_vae.engine.stops import PreemptionFlag
from dist_vae.models import build_model
from dist_vae.step_time import flops_and_operations

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [
    "configs/lsun_256_iterative.yaml",
    "configs/lsun_64_pixelvae.yaml",
    "configs/demo_iterative.yaml",
    "configs/demo_pixelvae.yaml",
    "configs/demo_scenes.yaml",
    "configs/debug.yaml",
]
WIDTH_FIELDS = ("channels", "nr_filters", "encoder_channels", "critic_hidden")
SCOPE = "scope:"
NODE = "autograd::engine::evaluate_function: "
MULTI_TENSOR = ("aten::_foreach_", "aten::_fused_")  # counted once, without their per-tensor calls


def scope_label(path: str, depth: int) -> str | None:
    """`steps.3.encoder` -> `steps.*.encoder`; None when the path has more than `depth` names."""
    parts = ["*" if p.isdigit() else p for p in path.split(".")]
    return ".".join(parts) if sum(p != "*" for p in parts) <= depth else None


@contextmanager
def scoped(model: nn.Module, depth: int) -> Iterator[None]:
    """Each module up to `depth` names deep runs its forward inside a profiler scope named by its path
    (the instance's forward is wrapped; no aten operation is added)."""

    def wrap(module: nn.Module, label: str) -> Callable:
        forward = module.forward

        def scoped_forward(*args, **kwargs):
            with record_function(SCOPE + label):
                return forward(*args, **kwargs)

        return scoped_forward

    wrapped = []
    for path, module in model.named_modules():
        label = "(model)" if not path else scope_label(path, depth)
        if label is not None and not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            module.forward = wrap(module, label)
            wrapped.append(module)
    try:
        yield
    finally:
        for module in wrapped:
            del module.forward


def attribute(events) -> collections.Counter:
    """aten events per scope (see the module docstring)."""

    def nearest(event):
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith((SCOPE, NODE)):
            parent = parent.cpu_parent
        return parent

    forward_scope = {}
    for event in events:
        if event.name.startswith("aten::") and event.sequence_nr >= 0:
            parent = nearest(event)
            if parent is not None and parent.name.startswith(SCOPE):
                forward_scope.setdefault(event.sequence_nr, parent.name[len(SCOPE) :])
    counts: collections.Counter = collections.Counter()
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        parent = nearest(event)
        if parent is None:
            counts["(autograd)"] += 1
        elif parent.name.startswith(SCOPE):
            counts[parent.name[len(SCOPE) :]] += 1
        elif parent.name.endswith("AccumulateGrad"):
            counts["(AccumulateGrad)"] += 1
        else:
            counts[forward_scope.get(parent.sequence_nr, "(autograd)")] += 1
    return counts


def step_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model(x, step=1000).total().backward()

    return step


def counted(event) -> bool:
    """Whether an aten event counts: not nested inside a multi-tensor operation (the docstring)."""
    if not event.name.startswith("aten::"):
        return False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(MULTI_TENSOR):
            return False
        parent = parent.cpu_parent
    return True


def count(step: Callable[[], None], model: nn.Module, depth: int | None, extra=None) -> dict:
    """Profile one call of `step` and `extra` (after a warm-up call of `step`): aten ops, all aten
    events, convolutions, per-scope counts (`extra`'s under "(update)")."""
    step()
    model.zero_grad(set_to_none=True)
    scopes = scoped(model, depth) if depth is not None else contextlib.nullcontext()
    with scopes, profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        step()
        if extra is not None:
            with record_function(SCOPE + "(update)"):
                extra()
    events = prof.events()
    ops = [e for e in events if counted(e)]
    names = collections.Counter(e.name for e in ops)
    scoped_events = attribute(events) if depth is not None else None
    extra_events = scoped_events.get("(update)", 0) if scoped_events is not None else 0
    return {
        "ops": len(ops),
        "events": sum(1 for e in events if e.name.startswith("aten::")),
        "extra_events": extra_events,
        "convs": names["aten::convolution"] + names["aten::convolution_backward"],
        "scopes": attribute(ops) if depth is not None else None,
        "names": names,
    }


def model_for(config: str, overrides: list[str], resolution: int | None, ckpt: str, seed: int = 0):
    cfg = load_config(ROOT / config if not Path(config).is_file() else config, overrides)
    res = resolution or cfg.data.resolution
    checkpointing = cfg.train.gradient_checkpointing if ckpt == "config" else ckpt == "on"
    torch.manual_seed(seed)
    return cfg, res, checkpointing, build_model(cfg.model, res, gradient_checkpointing=checkpointing)


def batch_of(batch: int, resolution: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, 3, resolution, resolution), generator=generator) / 127.5 - 1.0


def host_floor(args: argparse.Namespace, config: str, resolution: int, ckpt: str) -> tuple[float, int]:
    """Seconds per forward + backward and its aten ops, the arithmetic shrunk (see the docstring)."""
    cfg = load_config(ROOT / config if not Path(config).is_file() else config, args.overrides)
    names = {f.name for f in dataclasses.fields(cfg.model)}
    shrink = [f"model.{name}={args.floor_width}" for name in WIDTH_FIELDS if name in names]
    _, res, _, model = model_for(config, args.overrides + shrink, resolution, ckpt)
    step = step_fn(model, batch_of(1, res))
    ops = count(step, model, None)["ops"]
    times = []
    for _ in range(args.floor_steps):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times), ops


def trainer_update(config: str, overrides: list[str], res: int, checkpointing: bool, x: torch.Tensor):
    """The model as the trainer builds it, a step (forward, the update path's backward) and the
    trainer's update after it (UpdateStep.decide), fp32 in one process."""
    path = ROOT / config if not Path(config).is_file() else config
    extra = [
        f"data.resolution={res}",
        f"train.gradient_checkpointing={checkpointing}",
        "train.precision=fp32",
    ]
    cfg = load_config(path, overrides + extra)
    backend = build_backend(cfg, 1, 1.0)
    updater = UpdateStep(cfg.train, cfg.seed, backend, make_gate(cfg.train), PreemptionFlag())
    losses: list[torch.Tensor] = []

    def step() -> None:
        total = backend.model(x, step=1000).total()
        backend.update_path.backward(total)
        losses.append(total.detach())

    def update() -> None:
        updater.decide(1000, losses.pop())

    step()  # the optimizer's state exists before the counted step
    update()
    return backend.raw_model, step, update


def measure(args: argparse.Namespace, config: str) -> tuple:
    """Count (and print the attribution of) one config's step; its host floor unless --no-floor."""
    cfg, res, checkpointing, model = model_for(config, args.overrides, args.resolution, args.checkpointing)
    x = batch_of(args.batch, res)
    step, update = step_fn(model, x), None
    if args.optimizer:
        del model
        model, step, update = trainer_update(config, args.overrides, res, checkpointing, x)
    result = count(step, model, args.depth, update)
    traced = flops_and_operations(model, res)[1]
    floor = (None, None) if args.no_floor else host_floor(args, config, args.resolution, args.checkpointing)
    ckpt = "on" if checkpointing else "off"
    print(f"{config}: {cfg.model.kind}, {res} px, batch {args.batch}, checkpointing {ckpt}")
    for label, n in result["scopes"].most_common(args.top):
        print(f"    {n:8,d}  {label}")
    for name, n in result["names"].most_common(args.names):
        print(f"    {n:8,d}  {name}")
    return (config, cfg.model.kind, res, checkpointing, result, traced, *floor)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--resolution", type=int, default=None, help="default: data.resolution")
    parser.add_argument("--batch", type=int, default=1, help="images per counted step (default 1)")
    parser.add_argument("--checkpointing", choices=("config", "on", "off"), default="config")
    parser.add_argument("--optimizer", action="store_true", help="also count the trainer's update")
    parser.add_argument("--depth", type=int, default=2, help="module path names per attribution scope")
    parser.add_argument("--top", type=int, default=8, help="scopes listed per config")
    parser.add_argument("--names", type=int, default=0, help="also list the N most frequent op names")
    parser.add_argument("--no-floor", action="store_true", help="skip the host-floor measurement")
    parser.add_argument("--floor-width", type=int, default=4)
    parser.add_argument("--floor-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every config")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(args, config) for config in args.configs]
    print()
    header = f"{'config':26s} {'kind':14s} {'px':>4s} {'ckpt':>4s} {'aten ops':>9s} {'convs':>7s}"
    header += f" {'traced':>7s} {'update':>6s} {'events':>7s} {'floor s':>8s} {'us/op':>6s}"
    print(header)
    for config, kind, res, ckpt, result, traced, floor, floor_ops in rows:
        update = result["scopes"].get("(update)", 0)
        line = f"{Path(config).name:26s} {kind:14s} {res:4d} {'on' if ckpt else 'off':>4s} "
        line += f"{result['ops'] - update:9,d} {result['convs']:7,d} {traced:7,d} {update:6,d}"
        line += f" {result['extra_events']:7,d}"
        if floor is not None:
            line += f" {floor:8.3f} {1e6 * floor / floor_ops:6.1f}"
        print(line)


if __name__ == "__main__":
    main()
