"""train.compile=auto away from a GPU: compile only when the steps left pay back the compile time.

On a GPU auto compiles before the wrap (`backend.compiles_before_wrap`). On this project's CPU
compiling costs minutes (tools/bench/compile.py: 140 s for the debug PixelVAE, 164 s for the demo
iterative VAE) and saves a quarter to a third of each step, so it pays on long runs only. The run's own
updates are timed, nothing extra runs: the first after the start warms up, the next two are timed, and
at the following step boundary every rank takes the slowest rank's best time (one collective) and
compiles iff the steps left save more than compiling costs. The cost is the model's aten operations
per training step (what compile time grows with, counted on fake tensors) times seconds per
operation calibrated on this CPU. Compiling is in place, as before the wrap: the wrapped model and
the optimizer keep the same parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Iterator

import torch
from tqdm import tqdm

from dist_vae.config import Config
from dist_vae.engine.backend import Backend, agree, compiles_before_wrap
from dist_vae.engine.watchdog import Watchdog
from dist_vae.flops import operations_per_step
from dist_vae.models import build_model

SAVED_FRACTION = 0.25  # compiled / eager step time: 0.70 (debug PixelVAE), 0.75 (demo iterative VAE)
MIN_COMPILE_S = 20.0  # a saving below this is not worth even counting the operations
# Seconds of inductor compile per aten operation of a training step: the README's compile times on
# this CPU (140 s, 164 s) over the operations counted at configs/debug.yaml and
# configs/demo_iterative.yaml (5,470; 4,227 for its first two steps, see `COMPILED_STEPS`).
# A kind not measured gets the slowest rate.
SECONDS_PER_OPERATION = {"pixel_vae": 0.026, "iterative_vae": 0.039}
# The iterative VAE compiles step by step and steps 2..T share one graph (IterativeVAE.compile), so
# what is compiled is its first two steps, whatever T: the count is made on a model of that many.
COMPILED_STEPS = 2
TIMED_STEPS = 2  # after one warm-up update
COMPILE_STEP_ALLOWANCE = 3  # the compiling step may take this many times the estimate (hang watchdog)


def choose(left: int, eager_s: float, estimate: float) -> bool:
    """Whether compiling pays: the steps left save more time than compiling is estimated to cost."""
    return left * eager_s * SAVED_FRACTION > estimate


def compile_seconds(cfg: Config) -> tuple[float, int]:
    """(estimated seconds to compile the run's model, aten operations of one training step), counted
    on a fresh copy of the model built without touching the run's random streams."""
    model_cfg = cfg.model
    if getattr(model_cfg, "refine_steps", 0) > COMPILED_STEPS:
        model_cfg = dataclasses.replace(model_cfg, refine_steps=COMPILED_STEPS)
    with torch.random.fork_rng():
        model = build_model(model_cfg, cfg.data.resolution, cfg.train.gradient_checkpointing)
    operations = operations_per_step(model, cfg.data.resolution)
    rate = SECONDS_PER_OPERATION.get(cfg.model.kind, max(SECONDS_PER_OPERATION.values()))
    return operations * rate, operations


def _seconds(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


def _steps_left(left: int) -> str:
    return f"{left:,} step{'' if left == 1 else 's'} left"


class AutoCompile:
    """`with auto.timed(step):` around each update, `auto.settle(step)` at each step boundary."""

    def __init__(self, cfg: Config, backend: Backend, start_step: int, watchdog: Watchdog) -> None:
        self.cfg, self.backend, self.watchdog, self.start = cfg, backend, watchdog, start_step
        self.times: list[float] = []
        left = cfg.train.steps - start_step
        device = backend.accelerator.device
        self.active = cfg.train.compile == "auto" and not compiles_before_wrap(cfg, device) and left > 0
        if self.active and left <= 1 + TIMED_STEPS:
            self._say(f"eager ({_steps_left(left)}: too few to time)")
            self.active = False

    @contextlib.contextmanager
    def timed(self, step: int) -> Iterator[None]:
        """Time update `step` when it is one of the timed ones."""
        if not self.active or not self.start < step <= self.start + TIMED_STEPS:
            yield
            return
        started = time.perf_counter()
        yield
        self.times.append(time.perf_counter() - started)

    def settle(self, step: int) -> None:
        """Once the updates are timed (every rank at the same boundary): decide, say why, and compile."""
        if not self.active or len(self.times) < TIMED_STEPS:
            return
        self.active = False
        acc = self.backend.accelerator
        (eager_s,) = agree(acc, [torch.tensor(min(self.times), device=acc.device)])
        left = self.cfg.train.steps - step
        saved = left * eager_s * SAVED_FRACTION
        why = f"{_steps_left(left)} x {eager_s:.2g} s x {SAVED_FRACTION:g} saved = {_seconds(saved)} s"
        if saved < MIN_COMPILE_S:
            self._say(f"eager ({why} < {MIN_COMPILE_S:g} s, too little to be worth estimating)")
            return
        estimate, operations = compile_seconds(self.cfg)
        compiles = choose(left, eager_s, estimate)
        cost = f"~{_seconds(estimate)} s to compile {operations:,} operations"
        self._say(f"compile ({why} > {cost})" if compiles else f"eager ({why} < {cost})")
        if compiles:
            self.backend.raw_model.compile()  # in place; the iterative VAE compiles step by step
            self.watchdog.extend_next_step(COMPILE_STEP_ALLOWANCE * estimate)

    def _say(self, decision: str) -> None:
        if self.backend.accelerator.is_main_process:
            # on a line of its own, not after the open progress bar
            tqdm.write(f"train.compile=auto on the CPU: {decision}", file=sys.stderr)
