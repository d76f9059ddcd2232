"""The training loop: one Accelerator drives DDP or DeepSpeed (chosen by the accelerate config file).

One optimizer holds one parameter group per name in `model.param_groups()` ('main', and 'critic'
for the adversarial PixelVAE), so the loss is backpropagated once through one wrapped model, which
is all DeepSpeed allows. The step counter counts update attempts: skipped updates still consume
their batches, so data position, LR schedule and step agree after a resume.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed
from torch import nn

from dist_vae.config import Config, ConfigError, to_yaml
from dist_vae.data.stream import ShardStream, read_manifest
from dist_vae.engine import checkpoint
from dist_vae.engine.distributed import needs_gloo
from dist_vae.engine.ema import EMA
from dist_vae.engine.full_state import restore_scaler, scaler_state
from dist_vae.engine.logging import RunLogger
from dist_vae.engine.preemption import (
    REQUEUE_EXIT_CODE,
    PreemptionFlag,
    write_done_marker,
    write_requeue_marker,
)
from dist_vae.engine.resize import launched_world_size, resized_config
from dist_vae.engine.rng import preserved_rng, seed_everything_for_step
from dist_vae.engine.schedule import lr_factor
from dist_vae.engine.skip import SpikeDetector
from dist_vae.files import write_text_atomic
from dist_vae.models import build_model
from dist_vae.run_dir import CONFIG_FILE, config_dict
from dist_vae.sampling import grid_samples

log = logging.getLogger(__name__)
_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class Update:
    """Outcome of one optimizer step attempt."""

    grad_norm: float
    applied: bool
    reason: str = ""  # 'nonfinite' or 'spike' when not applied


@dataclass
class Window:
    """Running sums between two log points (tensors, so logging costs no per-step sync)."""

    scalars: dict[str, torch.Tensor] = field(default_factory=dict)
    micro_batches: int = 0
    steps: int = 0
    grad_norm: float = 0.0
    data_wait: float = 0.0
    paused: float = 0.0  # evaluation, sampling, checkpoints: not part of the training rate
    started: float = field(default_factory=time.perf_counter)

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.scalars[name] = self.scalars[name] + value if name in self.scalars else value


def make_accelerator(cfg: Config) -> Accelerator:
    # Without a GPU, Accelerate needs cpu=True to treat torchrun's processes as MULTI_CPU (else it
    # reports DistributedType.NO and nothing is wrapped in DDP), but cpu=True also turns DeepSpeed
    # off, which handles CPU by itself. Either way the backend must be gloo, not MPI.
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        # Accelerate would silently run fp32 (no loss scaler) on CPU.
        raise ConfigError("bad value 'fp16' for 'train.precision': fp16 needs a GPU; use bf16 or fp32 on CPU")
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    cpu = not torch.cuda.is_available() and not deepspeed
    handlers = [InitProcessGroupKwargs(backend="gloo")] if needs_gloo() else []
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=_PRECISION[cfg.train.precision], kwargs_handlers=handlers
    )
    # The launcher's environment may carry its own accumulation count; the run config decides.
    accelerator.gradient_accumulation_steps = cfg.train.accumulate
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = per_rank_batch(cfg)
        ds["gradient_accumulation_steps"] = cfg.train.accumulate
        ds["gradient_clipping"] = cfg.train.grad_clip
        ds["steps_per_print"] = 2**31 - 1  # the progress bar and TensorBoard are the only per-step output
    return accelerator


def per_rank_batch(cfg: Config) -> int:
    return cfg.train.batch_size if cfg.train.batch_size is not None else cfg.data.batch_size


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with one group per model group name, each at its configured LR."""
    lrs = {"main": cfg.train.lr, "critic": cfg.train.critic_lr}
    groups = model.param_groups()
    unknown = sorted(set(groups) - set(lrs))
    if unknown:
        raise ConfigError(f"model parameter groups {unknown} have no learning rate; known: {sorted(lrs)}")
    listed = [id(p) for params in groups.values() for p in params]
    if len(listed) != len(set(listed)) or set(listed) != {id(p) for p in model.parameters()}:
        raise ValueError(f"{type(model).__name__}.param_groups() must list every parameter exactly once")
    return torch.optim.AdamW(
        [{"params": params, "lr": lrs[name]} for name, params in groups.items()],
        weight_decay=cfg.train.weight_decay,
    )


def sample_rows(samples: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    """Grid rows: one per refinement step for a list of canvases, else a near-square tiling."""
    if isinstance(samples, list):
        return samples
    per_row = math.ceil(math.sqrt(samples.shape[0]))
    rows = list(samples.split(per_row))
    if rows[-1].shape[0] != per_row:
        rows = rows[:-1] or [rows[-1]]
    return rows


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.run_dir = Path(cfg.run_dir)
        resume_from = checkpoint.resolve_resume(cfg.resume, self.run_dir)
        read_manifest(cfg.data.path)  # a wrong data.path fails before any process group exists
        # Another world size than the checkpoint's: train.resize settles the batch before DeepSpeed reads it.
        cfg, self.resize = resized_config(cfg, per_rank_batch(cfg), resume_from, launched_world_size())
        self.cfg = cfg
        self.accelerator = make_accelerator(cfg)
        acc = self.accelerator
        if acc.num_processes != self.resize.world[1]:
            raise ConfigError(
                f"Accelerate sees {acc.num_processes} processes but WORLD_SIZE is {launched_world_size()}"
            )
        self.batch_size = per_rank_batch(cfg)
        if resume_from is not None:
            checkpoint.check_resume(resume_from, cfg)  # a refused resume leaves config.yaml as it was
        if acc.is_main_process:
            checkpoint.clean_partial(self.run_dir)
            try:
                write_text_atomic(self.run_dir / CONFIG_FILE, to_yaml(cfg))
            except OSError as exc:  # read-only or full file system: exit 2, like a failed checkpoint
                raise ConfigError(
                    f"run_dir {self.run_dir} is not writable: {exc.strerror} ({exc.filename})"
                ) from exc
        acc.wait_for_everyone()

        set_seed(cfg.seed)  # identical initial weights on every rank
        model = build_model(cfg.model, cfg.data.resolution, cfg.train.gradient_checkpointing)
        self.group_names = list(model.param_groups())
        optimizer = make_optimizer(model, cfg)
        self.base_lrs = [group["lr"] * self.resize.lr_scale for group in optimizer.param_groups]
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.raw_model = acc.unwrap_model(self.model)
        self.ema = EMA(self.raw_model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        t = cfg.train
        self.spikes = SpikeDetector(t.spike_window, t.spike_k, t.spike_warmup, t.max_consecutive_skips)
        self.skipped = {"nonfinite": 0, "spike": 0}
        self.step = 0

        self.stream = ShardStream(
            cfg.data, "train", acc.process_index, acc.num_processes, cfg.seed, batch_size=self.batch_size
        )
        # A missing val split fails now, not at the first evaluation; an empty one turns validation off.
        self.validate = self._val_stream().total > 0
        if not self.validate and acc.is_main_process:
            log.warning("split 'val' of %s is empty: validation is off", cfg.data.path)
        if resume_from is not None:
            loaded = checkpoint.load_checkpoint(
                acc, resume_from, model=self.model, optimizer=self.optimizer, ema=self.ema
            )
            restore_scaler(acc, self.model, loaded.scaler_state)
            self._load_trainer_state(loaded.step, loaded.meta)
        self.preemption = PreemptionFlag()
        if acc.is_main_process and self.resize.line():
            print(self.resize.line(), file=sys.stderr)
        self.logger = RunLogger(self.run_dir, t.steps, self.step, enabled=acc.is_main_process)
        self.logger.scalars(self.resize.scalars(), self.step)

    # --- state ---------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        """What the checkpoint keeps beside weights and optimizer (JSON)."""
        acc = self.accelerator
        return {
            "config": config_dict(self.cfg),
            "global_batch": self.batch_size * acc.num_processes * self.cfg.train.accumulate,
            "reference_global_batch": self.resize.reference_global_batch,
            "data": self.stream.state_dict(),
            "spikes": self.spikes.state_dict(),
            "skipped": dict(self.skipped),
        }

    def _load_trainer_state(self, step: int, meta: dict[str, Any]) -> None:
        self.step = step
        self.stream.load_state_dict(meta["data"])
        self.spikes.load_state_dict(meta["spikes"])
        self.skipped = dict(meta["skipped"])

    def save(self) -> Path:
        acc, keep = self.accelerator, self.cfg.train.keep_checkpoints
        return checkpoint.save_checkpoint(
            acc, self.run_dir, self.step, model=self.model, optimizer=self.optimizer, ema=self.ema,
            scaler_state=scaler_state(acc, self.model), meta=self._meta(), keep=keep,
        )  # fmt: skip

    # --- one update ----------------------------------------------------------------------------
    def _set_lr(self) -> None:
        t = self.cfg.train
        factor = lr_factor(self.step, t.warmup, t.steps, t.schedule)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def _apply_update(self) -> Update:
        """Clip, decide (identically on all ranks) whether to skip, and step. DDP/single process."""
        acc = self.accelerator
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
        norm = float(acc.clip_grad_norm_(self.model.parameters(), max_norm))
        nonfinite = not math.isfinite(norm)
        spike = not nonfinite and self.spikes.is_spike(norm)
        votes = acc.reduce(torch.tensor([float(nonfinite), float(spike)], device=acc.device), "sum")
        nonfinite, spike = bool(votes[0] > 0), bool(votes[1] > 0)
        fp16 = acc.scaler is not None
        if nonfinite and fp16:
            self.optimizer.step()  # the scaler skips it and lowers the scale
        elif spike and fp16:
            acc.scaler.update()  # closes this unscale_ so the next step can unscale again
        elif not (nonfinite or spike):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if nonfinite or spike:
            return Update(norm, False, "nonfinite" if nonfinite else "spike")
        return Update(norm, not self.optimizer.step_was_skipped)

    def _deepspeed_update(self) -> Update:
        """DeepSpeed steps inside `backward`; ZeRO itself skips a non-finite update, so only report it."""
        engine = self.accelerator.deepspeed_engine_wrapped.engine
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        if engine.was_step_applied():
            return Update(norm, True)
        return Update(norm, False, "nonfinite")

    def _fetch(self, batches: Iterator[torch.Tensor], window: Window) -> torch.Tensor:
        started = time.perf_counter()
        with preserved_rng():
            x = next(batches)
        window.data_wait += time.perf_counter() - started
        return x.to(self.accelerator.device, non_blocking=True)

    def _train_step(self, batches: Iterator[torch.Tensor], window: Window) -> Update:
        acc = self.accelerator
        seed_everything_for_step(self.cfg.seed, self.step, acc.process_index)
        self._set_lr()
        update = None
        for _ in range(self.cfg.train.accumulate):
            x = self._fetch(batches, window)
            with acc.accumulate(self.model):
                out = self.model(x, step=self.step)
                acc.backward(out.total())
                window.add("loss", out.loss)
                for name, value in out.scalars.items():
                    window.add(name, value)
                for name, value in out.aux_losses.items():
                    window.add(f"aux/{name}", value)
                window.micro_batches += 1
                if acc.sync_gradients:
                    if acc.distributed_type == DistributedType.DEEPSPEED:
                        update = self._deepspeed_update()
                    else:
                        update = self._apply_update()
        assert update is not None, "the accumulation window ended without a gradient sync"
        if update.applied and self.ema is not None:
            self.ema.update(self.raw_model)
        if not update.applied:
            self.skipped[update.reason] += 1
        window.steps += 1
        if math.isfinite(update.grad_norm):
            window.grad_norm += update.grad_norm
        return update

    # --- evaluation, samples, logs -------------------------------------------------------------
    def _eval_model(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.raw_model

    def _val_stream(self) -> ShardStream:
        acc = self.accelerator
        return ShardStream(
            self.cfg.data, "val", acc.process_index, acc.num_processes, self.cfg.seed,
            batch_size=self.batch_size, training=False,
        )  # fmt: skip

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean bits/dim over (at most train.eval_batches batches per rank of) the val split."""
        acc, cfg = self.accelerator, self.cfg
        net = self._eval_model()
        was_training = net.training
        totals = torch.zeros(2, dtype=torch.float64, device=acc.device)
        stream = self._val_stream()
        with acc.autocast():
            torch.manual_seed(cfg.seed + self.step)
            net.eval()
            for i, x in enumerate(stream):
                if i == cfg.train.eval_batches:
                    break
                out = net(x.to(acc.device), step=self.step)
                totals[0] += out.scalars["bpd"].double() * x.shape[0]
                totals[1] += x.shape[0]
            net.train(was_training)
        totals = acc.reduce(totals, "sum")
        return float(totals[0] / totals[1])

    @torch.no_grad()
    def sample(self) -> None:
        if not self.accelerator.is_main_process:
            return
        net = self._eval_model()
        was_training = net.training
        generator = torch.Generator(self.accelerator.device).manual_seed(self.cfg.seed + self.step)
        with self.accelerator.autocast():
            net.eval()
            samples = grid_samples(net, self.cfg.train.sample_count, generator=generator)
            net.train(was_training)
        self.logger.samples(sample_rows(samples), self.step)

    def _log(self, window: Window) -> float:
        acc = self.accelerator
        names = sorted(window.scalars)
        means = torch.stack([window.scalars[n] / window.micro_batches for n in names]).to(acc.device)
        means = acc.reduce(means, "mean")
        elapsed = time.perf_counter() - window.started - window.paused
        images = window.micro_batches * self.batch_size * acc.num_processes
        values = {f"train/{n}": float(v) for n, v in zip(names, means, strict=True)}
        values["train/grad_norm"] = window.grad_norm / window.steps
        for name, group in zip(self.group_names, self.optimizer.param_groups, strict=True):
            values[f"lr/{name}"] = group["lr"]
        values["perf/img_per_s"] = images / elapsed
        values["perf/data_wait_fraction"] = window.data_wait / elapsed
        values["skipped/nonfinite"] = self.skipped["nonfinite"]
        values["skipped/spike"] = self.skipped["spike"]
        if acc.scaler is not None:
            values["train/loss_scale"] = acc.scaler.get_scale()
        self.logger.scalars(values, self.step)
        return values["train/loss"]

    # --- the loop ------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to train.steps (exit code 0) or until preempted (REQUEUE_EXIT_CODE)."""
        acc, t = self.accelerator, self.cfg.train
        self.preemption.install()
        try:
            batches = iter(self.stream)
            window = Window()
            while self.step < t.steps:
                self._train_step(batches, window)
                self.step += 1
                if self.step % t.log_every == 0 or self.step == t.steps:
                    self.logger.progress(self.step, self._log(window))
                    window = Window()
                else:
                    self.logger.progress(self.step, None)
                paused = time.perf_counter()
                if self.validate and self.step % t.eval_every == 0:
                    self.logger.scalars({"val/bpd": self.evaluate()}, self.step)
                if self.step % t.sample_every == 0:
                    self.sample()
                preempted = self._preemption_agreed()
                if preempted or self.step % t.checkpoint_every == 0 or self.step == t.steps:
                    self.save()
                window.paused += time.perf_counter() - paused
                if preempted:
                    if acc.is_main_process:
                        write_requeue_marker(self.run_dir, self.step, self.preemption.signal_name or "peer")
                    # No rank exits before the marker exists: a launcher that exits early can make the
                    # cluster kill the other nodes (srun --kill-on-bad-exit) before rank 0 writes it.
                    acc.wait_for_everyone()
                    return REQUEUE_EXIT_CODE
            if acc.is_main_process:
                write_done_marker(self.run_dir, self.step)
            acc.wait_for_everyone()
            return 0
        finally:
            self.preemption.restore()
            self.logger.close()
            acc.end_training()

    def _preemption_agreed(self) -> bool:
        """Any rank signalled -> every rank stops at this same boundary."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return self.preemption.requested
        flag = torch.tensor([float(self.preemption.requested)], device=acc.device)
        return bool(acc.reduce(flag, "sum")[0] > 0)


def train(cfg: Config) -> int:
    return Trainer(cfg).fit()
