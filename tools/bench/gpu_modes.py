"""The trainer's own step in each way of executing it, measured beside the planner's prediction.

Rows: for each LSUN config (its resolution, precision and checkpointing), each mode of
dist_vae/step_time.py (eager: train.compile=off; compiled: train.compile=on; graphed:
train.cuda_graphs=true) at two per-GPU batches: the config's, and the planner's smallest
compute-bound batch for that mode where it fits the GPU's memory (tools/plan_memory.py's arithmetic).
A step is the trainer's: `build_backend` and `UpdateStep` (autocast forward, backward, norm, skip
decision, clipping, masked fused AdamW, EMA) on one batch in one buffer, as `static_batches` feeds it.

  ops      aten operations the host dispatched in one step (torch.profiler; tools/bench/ops.py's rule)
  kernels  GPU kernels and copies the step ran (GPU only)
  graphs   CUDA graph launches in the step (GPU only): none in graphed mode means inductor skipped
           the graphs and the row measured a compiled step
  host ms  the host's time to issue one step begun on an idle GPU, without waiting for it at the end:
           the host floor where the GPU keeps up; an upper bound where the launch queue fills
  GPU ms   the time some kernel of the step was running (the union of their intervals)
  step ms  back-to-back steps: wall clock / steps, the GPU synchronised at both ends
  regime   compute-bound where the GPU is busy for at least BUSY_COMPUTE_BOUND of the step
The predicted columns are `dist_vae.step_time.predict` for the same batch and mode.
"""

from __future__ import annotations

import gc
import itertools
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ops import counted  # tools/bench/ops.py, beside this file
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from dist_vae.commands.plan_memory import activations, largest_batch, state_bytes
from dist_vae.compat.torch_ops import FakeTensorMode
from dist_vae.config import load_config
from dist_vae.engine.backend import build_backend
from dist_vae.engine.monitor import Window
from dist_vae.engine.step import UpdateStep, make_gate
from dist_vae.engine.stops import PreemptionFlag
from dist_vae.flops import flops_per_image, peak_flops
from dist_vae.models import build_model
from dist_vae.precision import DTYPES
from dist_vae.step_time import MODES, Prediction, operations_per_step, predict

MODE_OVERRIDES = {
    "eager": ["train.compile=off", "train.cuda_graphs=false"],
    "compiled": ["train.compile=on", "train.cuda_graphs=false"],
    "graphed": ["train.cuda_graphs=true"],
}
BUSY_COMPUTE_BOUND = 0.8
HEADROOM = 0.1  # of the GPU's memory kept free, as tools/plan_memory.py keeps by default
WARMUP = 3  # compilation, then cudagraph trees' warm-up run and recording, then one replay


@dataclass
class Plan:
    """The planner's figures for one config on this device."""

    path: str
    overrides: list[str]
    kind: str
    operations: int  # per step at batch 1, recomputation included
    flops: float  # per image, forward + backward
    peak: float | None  # FLOP/s; None: no prediction (a CPU without --peak-flops)
    fits: int | None  # the largest batch in this GPU's memory; None on a CPU


@dataclass
class Row:
    plan: Plan
    mode: str
    batch: int
    which: str  # "config" or "planner"
    prediction: Prediction | None
    cells: dict[str, str]


def make_plan(path: str, overrides: list[str], device: torch.device, peak_override: float | None) -> Plan:
    cfg = load_config(path, overrides)
    res, ckpt = cfg.data.resolution, cfg.train.gradient_checkpointing
    peak = peak_flops(device, DTYPES[cfg.train.precision], peak_override)
    operations = operations_per_step(lambda: build_model(cfg.model, res, ckpt), res)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, res, ckpt)
    flops, params = flops_per_image(model, res), sum(p.numel() for p in model.parameters())
    fits = None
    if device.type == "cuda":
        with FakeTensorMode():
            acts = activations(build_model(cfg.model, res, ckpt), res, cfg.train.precision)
        budget = torch.cuda.get_device_properties(device).total_memory * (1 - HEADROOM)
        fits = largest_batch(budget, state_bytes(params, cfg.train.ema_decay > 0), acts)
    return Plan(path, overrides, cfg.model.kind, operations, flops, peak, fits)


def planned_rows(plan: Plan, config_batch: int, cap: int | None, cuda: bool) -> list[Row]:
    """Every row of one config, the planner's batch only where it fits and differs from the config's."""
    rows = []
    for mode in MODES:
        batches = {"config": config_batch}
        if plan.peak:
            wanted = predict(plan.operations, plan.flops, 1, plan.peak, mode).min_batch
            wanted = min(wanted, cap) if cap else wanted
            if wanted != config_batch and (plan.fits is None or wanted <= plan.fits):
                batches["planner"] = wanted
        for which, batch in batches.items():
            p = predict(plan.operations, plan.flops, batch, plan.peak, mode) if plan.peak else None
            skip = {} if cuda or mode != "graphed" else {"note": "not run: CUDA graphs need a GPU"}
            rows.append(Row(plan, mode, batch, which, p, skip))
    return rows


def priority(row: Row) -> tuple[int, int]:
    """Eager rows first (quick), then the config's batch compiled and graphed, then the planner's."""
    return (0 if row.mode == "eager" else 1 if row.which == "config" else 2, MODES.index(row.mode))


@contextmanager
def compile_backend(backend: str | None) -> Iterator[None]:
    """torch.compile with `backend` wherever the trainer compiles (--tiny: dynamo runs, inductor not)."""
    if backend is None:
        yield
        return
    original = nn.Module.compile

    def compile_with(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("backend", backend)
        original(self, *args, **kwargs)

    nn.Module.compile = compile_with
    try:
        yield
    finally:
        nn.Module.compile = original


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def busy_ms(events: list[Any]) -> float:
    """The union of the intervals the GPU events ran in, in ms."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    total, reach = 0.0, float("-inf")
    for start, end in spans:
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total / 1e3


def profiled(step: Callable[[int], None], i: int, device: torch.device) -> dict[str, str]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        step(i)
        synchronize(device)
    events = prof.events()
    gpu = [e for e in events if e.device_type == DeviceType.CUDA]
    cells = {"ops": f"{sum(1 for e in events if counted(e))}"}
    if device.type == "cuda":
        launches = sum(1 for e in events if e.name.startswith("cudaGraphLaunch"))
        cells |= {"kernels": f"{len(gpu)}", "graphs": f"{launches}", "gpu_ms": f"{busy_ms(gpu):.1f}"}
    return cells


def measure(row: Row, device: torch.device, steps: int, warmup: int) -> dict[str, str]:
    """The row's cells: its trainer's step built afresh, warmed up, timed, then profiled once."""
    overrides = [*row.plan.overrides, *MODE_OVERRIDES[row.mode], f"data.batch_size={row.batch}"]
    cfg = load_config(row.plan.path, overrides)
    backend = build_backend(cfg, 1, 1.0)
    try:
        updater = UpdateStep(cfg.train, cfg.seed, backend, make_gate(cfg.train, device), PreemptionFlag())
        res = cfg.data.resolution
        x = torch.rand(row.batch, 3, res, res, device=device) * 2 - 1
        batches = itertools.repeat(x)

        def step(i: int) -> None:
            updater(i, batches, Window())

        for i in range(warmup):
            step(i)
        host = []
        for i in range(warmup, warmup + steps):
            synchronize(device)
            started = time.perf_counter()
            step(i)
            host.append(time.perf_counter() - started)
        synchronize(device)
        started = time.perf_counter()
        for i in range(warmup + steps, warmup + 2 * steps):
            step(i)
        synchronize(device)
        step_s = (time.perf_counter() - started) / steps
        cells = profiled(step, warmup + 2 * steps, device)
    finally:
        backend.accelerator.free_memory()
        del backend
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rate = row.batch / step_s
    cells |= {"host_ms": f"{1e3 * statistics.median(host):.1f}", "step_ms": f"{1e3 * step_s:.1f}"}
    cells["img_s"] = f"{rate:.1f}"
    if row.plan.peak:
        cells["mfu"] = f"{100 * row.plan.flops * rate / row.plan.peak:.1f}"
    if "gpu_ms" in cells:
        busy = float(cells["gpu_ms"]) / (1e3 * step_s)
        cells["regime"] = "compute-bound" if busy >= BUSY_COMPUTE_BOUND else "host-bound"
    return cells


def run_row(row: Row, device: torch.device, steps: int, warmup: int, backend: str | None) -> None:
    """Fills `row.cells`; an out-of-memory or a failure becomes the row's note, not the table's end."""
    if row.cells:
        return
    torch.compiler.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with compile_backend(backend):
            row.cells = measure(row, device, steps, warmup)
        if device.type == "cuda":
            row.cells["peak_gib"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}"
    except torch.OutOfMemoryError:
        row.cells = {"note": "out of memory"}
    except Exception as exc:
        traceback.print_exc()
        row.cells = {"note": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


COLUMNS = [
    ("config", 22), ("mode", 9), ("batch", 7), ("ops", 8), ("kernels", 8), ("graphs", 7), ("host ms", 9),
    ("GPU ms", 8), ("step ms", 9), ("img/s", 8), ("MFU %", 7), ("peak GiB", 9), ("regime", 14),
    ("predicted", 32),
]  # fmt: skip
KEYS = ["ops", "kernels", "graphs", "host_ms", "gpu_ms", "step_ms", "img_s", "mfu", "peak_gib", "regime"]


def cells_of(row: Row) -> list[str]:
    """The row's cells in COLUMNS' order ('-' where not measured, the note across the measured ones)."""
    p = row.prediction
    predicted = "-" if p is None else f"{p.step_s * 1e3:.1f} ms {p.regime} {100 * p.mfu:.0f}%"
    batch = f"{row.batch}" + ("*" if row.which == "planner" else "")
    head = [Path(row.plan.path).stem, row.mode, batch]
    if "note" in row.cells:
        return [*head, row.cells["note"], predicted]
    return [*head, *(row.cells.get(k, "-") for k in KEYS), predicted]


def text_line(cells: list[str]) -> str:
    if len(cells) < len(COLUMNS):  # a note: the measured columns' width as one cell
        width = sum(w for _, w in COLUMNS[3:-1])
        cells = [*cells[:3], cells[3].ljust(width), cells[4]]
        widths = [w for _, w in COLUMNS[:3]] + [width, COLUMNS[-1][1]]
    else:
        widths = [w for _, w in COLUMNS]
    return " ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def markdown(rows: list[Row], title: str) -> str:
    """The table docs/performance.md keeps between its bench-gpu markers."""
    lines = [title, "", "| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = cells_of(row)
        if len(cells) < len(COLUMNS):
            cells = [*cells[:3], cells[3], *[""] * (len(COLUMNS) - 5), cells[4]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- bench-gpu: begin -->", "<!-- bench-gpu: end -->"


def write_docs(block: str, source: Path, target: Path) -> None:
    """`source` with the text between its bench-gpu markers replaced by `block`, written to `target`."""
    text = source.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: {source} has no '{BEGIN}' ... '{END}' block to write the table into")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    target.write_text(f"{head}{BEGIN}\n{block}{END}{tail}")
