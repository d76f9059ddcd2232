"""What the steps between two log points did, and the scalars a log point writes from it.

Everything a step adds stays on the device until the log point reads it, once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from dist_vae.engine.backend import Backend
from dist_vae.engine.health import CodeHealth, per_unit
from dist_vae.engine.logging import RunLogger
from dist_vae.engine.skip import UpdateGate
from dist_vae.engine.streams import Streams
from dist_vae.models.output import CodeStats


@dataclass
class Window:
    """Running sums between two log points (device tensors, read once at the log point)."""

    scalars: dict[str, torch.Tensor] = field(default_factory=dict)
    codes: list[CodeStats] = field(default_factory=list)  # each micro-batch's use of the code
    micro_batches: int = 0
    steps: int = 0
    grad_norm: float = 0.0  # sum of the norms the skip decision read anyway; NaN/inf propagate
    data_wait: float = 0.0
    paused: float = 0.0  # evaluation, sampling, checkpoints: not part of the training rate
    started: float = field(default_factory=time.perf_counter)

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.scalars[name] = self.scalars[name] + value if name in self.scalars else value

    @contextmanager
    def pause(self) -> Iterator[None]:
        """Work inside is left out of the training rate."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - started


class ScalarLog:
    """Writes a window's means, rates, learning rates, skip counts and code health to TensorBoard
    (rank 0)."""

    def __init__(
        self, backend: Backend, gate: UpdateGate, streams: Streams, logger: RunLogger, health: CodeHealth
    ) -> None:
        self.backend, self.gate, self.streams, self.logger = backend, gate, streams, logger
        self.health = health

    def write(self, window: Window, step: int) -> float:
        """Log the window at `step` (collective); the mean training bits/dim, for the progress bar."""
        b = self.backend
        acc = b.accelerator
        names = sorted(window.scalars)
        means = torch.stack([window.scalars[n] / window.micro_batches for n in names]).to(acc.device)
        units = per_unit(window.codes, acc.device)
        means, units = acc.reduce(torch.cat([means, units]), "mean").split([len(names), units.numel()])
        elapsed = time.perf_counter() - window.started - window.paused
        rank_images = window.micro_batches * self.streams.batch_size
        values = {f"train/{n}": v for n, v in zip(names, means.tolist(), strict=True)}
        values["train/grad_norm"] = window.grad_norm / window.steps
        for name, group in zip(b.group_names, b.optimizer.param_groups, strict=True):
            values[f"lr/{name}"] = group["lr"]
        values["perf/img_per_s"] = rank_images * acc.num_processes / elapsed
        values["perf/img_per_s_per_rank"] = rank_images / elapsed
        if b.peak_flops:
            values["perf/mfu"] = values["perf/img_per_s_per_rank"] * b.flops_per_image / b.peak_flops
        values["perf/data_wait_fraction"] = window.data_wait / elapsed
        for reason, count in self.gate.skipped.items():
            values[f"skipped/{reason}"] = count
        for kind, count in self.streams.skipped().items():
            values[f"data/skipped_{kind}"] = count
        values.update(self.health.values(window.codes, units, step))
        if b.update_path.scaler is not None:
            values["train/loss_scale"] = b.update_path.scaler.get_scale()
        self.logger.scalars(values, step)
        return values["train/bpd"]
