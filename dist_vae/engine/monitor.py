"""What a run shows while it trains (rank 0): the progress bar, TensorBoard scalars and images, PNG
sample grids, and at each log point the scalars of the steps since the last one, including whether the
latent code is in use.

Other ranks get a `RunLogger(enabled=False)` whose methods do nothing, so the trainer never branches
on the rank to log. Everything a step adds to the `Window` stays on the device until the log point
reads it, once.

Code health: a model whose LossOutput carries `code` (models/output.py: CodeStats) gets at every log
point
  health/active_units            units whose posterior mean varies over images, Var_x E_q[z_u | x] > 0.01
                                 (Burda et al.; `metrics.active_units`), over the newest
                                 health.units_buffer images rank 0 trained on
  health/active_units_relative   the same count on the means in units of each unit's posterior std:
                                 Var_x E_q[z_u | x] > 0.01 E_x Var_q[z_u | x]
  health/kl_per_unit_min, health/kl_per_unit_median   per-unit KL in nats, mean over the log window
                                 and the ranks
  health/posterior_variance      the encoder's posterior variance, mean over units, images and ranks
When the code has collapsed (no relatively active unit, or every unit's KL below health.kl_threshold)
for health.collapse_logs log points in a row, rank 0 prints one warning line, once per process. The
alarm counts relative to the posterior's spread because Burda's threshold presumes codes at the
prior's scale, which only a KL term enforces: without it (model.reg=none) the encoder shrinks means
and variances together, and the absolute count reads 0 while the code still carries information.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm import tqdm

from dist_vae.config import HealthConfig
from dist_vae.engine.backend import Backend
from dist_vae.engine.feeds import Streams
from dist_vae.files import image_grid, save_png_atomic
from dist_vae.metrics import active_units
from dist_vae.models.output import CodeStats, LossOutput
from dist_vae.run_layout import RunDir
from dist_vae.trackers import LogConfig, Trackers, flat


class RunLogger:
    def __init__(
        self,
        run: RunDir,
        total_steps: int,
        start_step: int,
        enabled: bool,
        log: LogConfig | None = None,
        hyperparameters: object = None,
    ) -> None:
        """`log.trackers`: where scalars and grids go besides the PNGs (dist_vae/trackers.py);
        `hyperparameters`: the resolved configuration, which wandb and MLflow record."""
        self.enabled, self.run = enabled, run
        self._writer = None
        self._bar = None
        self._trackers: Trackers | None = None
        log = log or LogConfig()
        if enabled:
            if "tensorboard" in log.trackers:
                # TensorBoard's writer loads slowly: only rank 0 imports it.
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(run.tensorboard))
            self._trackers = Trackers(run, log, flat(hyperparameters) if hyperparameters else {})
            if start_step < total_steps:  # a finished run says so in one line, not with a full bar
                self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._trackers is not None and values:
            self._trackers.scalars(values, step)
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)

    def progress(self, step: int, bpd: float | None) -> None:
        """Advance the bar to `step`; `bpd`: the training bits/dim of the last window, when logged."""
        if self._bar is None:
            return
        self._bar.update(step - self._bar.n)
        if bpd is not None:
            self._bar.set_postfix(bpd=f"{bpd:.4g}", refresh=False)

    def line(self, text: str) -> None:
        """One line on stderr that does not tear the progress bar."""
        if self.enabled:
            tqdm.write(text, file=sys.stderr)

    def samples(self, rows: Sequence[torch.Tensor], step: int) -> None:
        if not self.enabled:
            return
        grid = image_grid(rows)
        save_png_atomic(grid, self.run.sample_grid(step))
        if self._trackers is not None:
            self._trackers.image("samples", grid, step)
        if self._writer is not None:
            self._writer.add_image("samples", grid, step, dataformats="HWC")

    def close(self) -> None:
        if self._trackers is not None:
            self._trackers.close()
        if self._writer is not None:
            self._writer.close()
        if self._bar is not None:
            self._bar.close()


@dataclass
class Window:
    """Running sums between two log points (device tensors, read once at the log point).

    The window keeps copies, never the model's output tensors themselves: under
    `train.cuda_graphs=true` those live in the captured graph's memory, which the next replay
    overwrites before the log point reads them.
    """

    scalars: dict[str, torch.Tensor] = field(default_factory=dict)
    codes: list[CodeStats] = field(default_factory=list)  # each micro-batch's use of the code
    micro_batches: int = 0
    steps: int = 0
    grad_norm: float | torch.Tensor = 0.0  # sum of the steps' norms (on the device); NaN/inf propagate
    data_wait: float = 0.0
    paused: float = 0.0  # evaluation, sampling, checkpoints: not part of the training rate
    started: float = field(default_factory=time.perf_counter)

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.scalars[name] = self.scalars[name] + value if name in self.scalars else value.clone()

    def add_output(self, out: LossOutput) -> None:
        """One micro-batch's loss, scalars, auxiliary losses and code statistics."""
        self.add("loss", out.loss)
        for name, value in out.scalars.items():
            self.add(name, value)
        for name, value in out.aux_losses.items():
            self.add(f"aux/{name}", value)
        if out.code is not None:
            c = out.code
            self.codes.append(CodeStats(c.mean.clone(), c.kl.clone(), c.variance.clone(), c.regularizer))
        self.micro_batches += 1

    @contextmanager
    def pause(self) -> Iterator[None]:
        """Work inside is left out of the training rate."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - started


def per_unit(codes: list[CodeStats], device: torch.device) -> torch.Tensor:
    """[2 D]: the window's per-unit KL and posterior variance, micro-batch means, to be averaged over
    the ranks with the other scalars of the log point ([0] when the model reports no code)."""
    if not codes:
        return torch.zeros(0, device=device)
    kl = torch.stack([c.kl for c in codes]).mean(dim=0)
    return torch.cat([kl, torch.stack([c.variance for c in codes]).mean(dim=0)]).to(device)


class CodeHealth:
    """Rank 0's running buffer of posterior means and the collapse alarm's state."""

    def __init__(self, cfg: HealthConfig, logger: RunLogger) -> None:
        self.cfg, self.logger = cfg, logger
        self.means: torch.Tensor | None = None  # [<= units_buffer, D], newest last
        self.collapsed_logs = 0
        self.warned = False

    def values(self, codes: list[CodeStats], units: torch.Tensor, step: int) -> dict[str, float]:
        """The health/* scalars of this log point from the window's `codes` and the ranks' mean
        `per_unit` values; warns when the code has stayed collapsed long enough ({} on other ranks)."""
        if not codes or not self.logger.enabled:
            return {}
        newest = torch.cat([c.mean for c in codes])
        recent = newest if self.means is None else torch.cat([self.means, newest.to(self.means)])
        self.means = recent[-self.cfg.units_buffer :]
        kl, variance = units.float().cpu().chunk(2)
        values = {
            "health/kl_per_unit_min": kl.min().item(),
            "health/kl_per_unit_median": kl.quantile(0.5).item(),
            "health/posterior_variance": variance.mean().item(),
        }
        active = None
        if self.means.shape[0] >= 2:
            values["health/active_units"] = float(active_units(self.means))
            active = active_units(self.means / variance.sqrt().to(self.means))
            values["health/active_units_relative"] = float(active)
        collapsed = active == 0 or kl.max().item() < self.cfg.kl_threshold
        self.collapsed_logs = self.collapsed_logs + 1 if collapsed else 0
        if self.cfg.collapse_logs and self.collapsed_logs >= self.cfg.collapse_logs and not self.warned:
            self.warned = True
            self._warn(step, active, kl, codes[-1].regularizer)
        return values

    def _warn(self, step: int, active: int | None, kl: torch.Tensor, regularizer: str) -> None:
        units = kl.numel()
        counted = f"{active} of {units}" if active is not None else f"? of {units}"
        self.logger.line(
            f"warning: posterior collapse at step {step}: {counted} latent units active (relative to "
            f"their posterior spread), KL/unit median "
            f"{kl.quantile(0.5).item():.3g} nats, max {kl.max().item():.3g} ({regularizer}), "
            f"{self.collapsed_logs} log points in a row; z carries almost nothing about the images "
            "(the decoder models them alone, or the KL weight is too strong): see the README's "
            "failure modes"
        )


class SkipCounts(Protocol):
    """What a log point reads of the update gate (engine/step.py's UpdateGate)."""

    skipped: dict[str, int]


class ScalarLog:
    """Writes a window's means, rates, learning rates, skip counts and code health to TensorBoard
    (rank 0)."""

    def __init__(
        self, backend: Backend, gate: SkipCounts, streams: Streams, logger: RunLogger, health: CodeHealth
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
        values["train/grad_norm"] = float(window.grad_norm) / window.steps
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
        for kind, count in self.streams.remote().items():  # since this start (a resume counts afresh)
            values[f"data/remote_{kind}"] = count
        values.update(self.health.values(window.codes, units, step))
        if b.update_path.scaler is not None:
            values["train/loss_scale"] = b.update_path.scaler.get_scale()
        self.logger.scalars(values, step)
        return values["train/bpd"]
