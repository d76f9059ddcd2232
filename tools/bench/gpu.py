"""GPU check: the trainer's step per execution mode against the planner, then img/s, peak memory
and MFU of both models over precisions and checkpointing, one NCCL process group, and (given a base
revision) the step time against it.

    PYTHONPATH=. python tools/bench/gpu.py [--baseline REV] [--write-docs docs/performance.md]
    PYTHONPATH=. python tools/bench/gpu.py --tiny             # anywhere: tiny models on the CPU

First table (tools/bench/gpu_modes.py): both LSUN configs, each mode of dist_vae/step_time.py (eager,
compiled, graphed) at the config's per-GPU batch and at the planner's smallest compute-bound batch
(marked *): operations, kernels, host and GPU time per step, step time, img/s, MFU and the regime,
beside the prediction. --write-docs PATH writes that table into PATH, a copy of docs/performance.md
with the table between its bench-gpu markers, after every row (a run cut short keeps its rows).

Second table: {PixelVAE (configs/lsun_64_pixelvae.yaml), iterative VAE (configs/lsun_256_iterative.yaml)}
x {64, 256} px x {bf16, fp16 with GradScaler loss scaling} x gradient checkpointing {off, on}, eager,
a bare training step each (autocast forward, backward, AdamW) at a fixed batch.
MFU = FLOPs per image (dist_vae/flops.py, no recompute) x img/s / peak. No case starts after
--budget seconds; those left are listed as not run.
--tiny swaps in tiny models at 8 px, batches of 2 to 4, torch.compile's "eager" backend (dynamo is
exercised, inductor's code generation is not), gloo for NCCL and the process's peak RSS for memory;
there is no MFU or prediction without a peak (--peak-flops), and no graphed row without CUDA.

Then, with --baseline REV (or --baseline-tree DIR where the copy has no git history),
tools/bench/speed.py's before/after on the same device: each case's step time in this tree against
the base with its target, and per step what this tree spares the device: allocations, MB allocated
and kernel launches. --speed-args passes further options to it (e.g. '--rounds 1 --cases pixelcnnpp-64').
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import resource
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import gpu_modes  # tools/bench/gpu_modes.py, beside this file
import speed  # tools/bench/speed.py, beside this file
import torch
import torch.distributed as dist
from torch import nn

from dist_vae.config import load_config
from dist_vae.flops import flops_per_image, peak_flops
from dist_vae.models import build_model
from dist_vae.precision import DTYPES

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "performance.md"
MODELS = {"pixel_vae": "configs/lsun_64_pixelvae.yaml", "iterative_vae": "configs/lsun_256_iterative.yaml"}
TINY = {
    "pixel_vae": ["model.nr_resnet=1", "model.nr_filters=8", "model.nr_mix=2", "model.n_stages=2",
                  "model.latent_dim=4", "model.encoder_channels=8"],
    "iterative_vae": ["model.refine_steps=2", "model.latent_dims=[4,4]", "model.channels=4"],
}  # fmt: skip
BATCH = {64: 16, 256: 4, 8: 2, 16: 2}  # per GPU; 256 px PixelCNN++ at 160 filters is ~10 GiB/image


class TrainStep:
    """One training step as the trainer takes it: autocast forward, (scaled) backward, AdamW."""

    def __init__(self, model: nn.Module, precision: str, device: torch.device, backend: str | None) -> None:
        self.model = model.to(device)
        self.device, self.dtype = device, DTYPES[precision]
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if backend:
            model.compile(backend=backend)  # in place, as the trainer does (regionally where a model says so)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def __call__(self, x: torch.Tensor, step: int) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.model(x, step=step)
        self.scaler.scale(out.total()).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()


def model_config(kind: str, tiny: bool) -> Any:
    return load_config(ROOT / MODELS[kind], TINY[kind] if tiny else []).model


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated by PyTorch on a GPU; the process's peak RSS on a CPU (whole process)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


_FLOPS: dict[tuple[str, int], float] = {}


def model_flops(model: nn.Module, kind: str, resolution: int) -> float:
    """FLOPs per image, counted once per model and resolution (precision and flags do not change them)."""
    if (kind, resolution) not in _FLOPS:
        _FLOPS[kind, resolution] = flops_per_image(model, resolution)
    return _FLOPS[kind, resolution]


@dataclass
class Case:
    kind: str
    resolution: int
    precision: str
    checkpointing: bool

    def labels(self) -> list[str]:
        """The table's first four cells."""
        return [self.kind, str(self.resolution), self.precision, "on" if self.checkpointing else "off"]


def run_case(
    case: Case, device: torch.device, steps: int, tiny: bool, peak_override: float | None
) -> list[str]:
    """Table cells of one case: batch, img/s, peak GiB, MFU % ('OOM' when it does not fit)."""
    batch = BATCH[case.resolution]
    torch.manual_seed(0)
    model = build_model(model_config(case.kind, tiny), case.resolution, case.checkpointing)
    peak = peak_flops(device, DTYPES[case.precision], peak_override)
    flops = model_flops(model, case.kind, case.resolution) if peak is not None else math.nan
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        step = TrainStep(model, case.precision, device, None)
        x = torch.rand(batch, 3, case.resolution, case.resolution, device=device) * 2 - 1
        for i in range(1 if tiny else 2):  # warm-up: cuDNN autotuning, allocator growth
            step(x, i)
        gpu_modes.synchronize(device)
        started = time.perf_counter()
        losses = [step(x, i) for i in range(steps)]
        gpu_modes.synchronize(device)
        seconds = time.perf_counter() - started
    except torch.OutOfMemoryError:
        return [str(batch), "OOM", "-", "-"]
    if not all(math.isfinite(float(loss)) for loss in losses):
        raise RuntimeError(f"non-finite loss in case {case}")
    rate = batch * steps / seconds
    mfu = "-" if peak is None else f"{100 * flops * rate / peak:.3g}"
    return [str(batch), f"{rate:.2f}", f"{peak_memory_gib(device):.2f}", mfu]


def process_group_check(device: torch.device) -> str:
    """Init a world-size-1 process group (NCCL on a GPU, gloo on a CPU) and check one all_reduce."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        value = torch.full((4,), 3.0, device=device)
        dist.all_reduce(value)
        gpu_modes.synchronize(device)
        ok = bool((value == 3.0).all())
    finally:
        dist.destroy_process_group()
    if not ok:
        raise RuntimeError(f"{backend} all_reduce over one rank changed the tensor: {value.tolist()}")
    return (
        f"process group {backend}, world size 1: init + all_reduce ok ({time.perf_counter() - started:.2f} s)"
    )


def cases(tiny: bool) -> list[Case]:
    resolutions = (8,) if tiny else (64, 256)
    precisions = ("fp32", "bf16") if tiny else ("bf16", "fp16")
    # bf16 without checkpointing first: the rows most worth having if the budget cuts the table short.
    grid = itertools.product(precisions, (False, True), MODELS, resolutions)
    return [Case(kind, r, p, ckpt) for p, ckpt, kind, r in grid]


def modes_table(args: argparse.Namespace, device: torch.device, started: float) -> None:
    """The first table (gpu_modes.py), printed row by row and written into --write-docs after each."""
    overrides = {kind: [*TINY[kind], "data.resolution=8"] if args.tiny else [] for kind in MODELS}
    plans = [gpu_modes.make_plan(str(ROOT / path), overrides[kind], device, args.peak_flops)
             for kind, path in MODELS.items()]  # fmt: skip
    rows = []
    for plan in plans:
        batch = 2 if args.tiny else load_config(plan.path, plan.overrides).data.batch_size
        rows += gpu_modes.planned_rows(plan, batch, 4 if args.tiny else None, device.type == "cuda")
    rows.sort(key=gpu_modes.priority)
    title = f"{device_name(device)}, torch {torch.__version__}; * the planner's batch"
    print(f"\nthe trainer's step per mode ({title})")
    print(gpu_modes.text_line([name for name, _ in gpu_modes.COLUMNS]), flush=True)
    warmup, backend = (1, "eager") if args.tiny else (gpu_modes.WARMUP, None)
    for row in rows:
        if time.perf_counter() - started > args.budget:
            row.cells = row.cells or {"note": "not run: --budget spent"}
        gpu_modes.run_row(row, device, args.steps or (1 if args.tiny else 5), warmup, backend)
        print(gpu_modes.text_line(gpu_modes.cells_of(row)), flush=True)
        if args.write_docs:
            gpu_modes.write_docs(gpu_modes.markdown(rows, title), DOCS, args.write_docs)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU, in seconds")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 5, tiny 1)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which no case starts")
    parser.add_argument("--peak-flops", type=float, default=None, help="FLOP/s for MFU on an unlisted device")
    parser.add_argument("--write-docs", type=Path, help="docs/performance.md with the first table in it")
    parser.add_argument("--no-modes", action="store_true", help="skip the first table")
    base = parser.add_mutually_exclusive_group()
    base.add_argument("--baseline", metavar="REV", help="then speed.py's step times against this revision")
    base.add_argument("--baseline-tree", type=Path, help="the same against a checkout without git history")
    parser.add_argument("--speed-args", default="", help="more speed.py options, e.g. '--rounds 1'")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    steps = args.steps or (1 if args.tiny else 5)
    started = time.perf_counter()
    print(f"device {device_name(device)}, torch {torch.__version__}, {steps} timed steps")
    print(process_group_check(device))
    if not args.no_modes:
        modes_table(args, device, started)
    memory = "peak GiB" if device.type == "cuda" else "RSS GiB"
    header = ["model", "px", "prec", "ckpt", "batch", "img/s", memory, "MFU %"]
    print("\n" + "".join(f"{h:>14}" if i == 0 else f"{h:>9}" for i, h in enumerate(header)))
    for case in cases(args.tiny):
        if time.perf_counter() - started > args.budget:
            cells = ["-", "not run", "-", "-"]
        else:
            cells = run_case(case, device, steps, args.tiny, args.peak_flops)
        row = [*case.labels(), *cells]
        print("".join(f"{c:>14}" if i == 0 else f"{c:>9}" for i, c in enumerate(row)), flush=True)
    if args.baseline or args.baseline_tree:
        label = args.baseline or args.baseline_tree.name
        base = (
            ["--baseline", args.baseline] if args.baseline else ["--baseline-tree", str(args.baseline_tree)]
        )
        print(f"\nstep time, this tree against {label} (tools/bench/speed.py)", flush=True)
        threads = str(len(os.sched_getaffinity(0)))
        speed.main(["--device", device.type, "--threads", threads, *base, *shlex.split(args.speed_args)])


if __name__ == "__main__":
    main()
