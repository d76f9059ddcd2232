"""The training loop: one Accelerator drives DDP or DeepSpeed (chosen by the accelerate config file).

One optimizer holds one parameter group per name in `model.param_groups()` ('main', and 'critic'
for the adversarial PixelVAE), so the loss is backpropagated once through one wrapped model, which
is all DeepSpeed allows. The step counter counts update attempts: skipped updates still consume
their batches, so data position, LR schedule and step agree after a resume.

How an update is made is the backend's (engine/update.py, chosen once); whether it is applied is
decided here for every backend alike (engine/skip.py). A step reads the device once: the gradient
norm, the skip votes and the preemption flag, all-reduced together (as torch's GradScaler reads its
inf check every step). Everything logged stays on the device until a log point.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import distributed as dist
from torch import nn

from dist_vae.config import Config, ConfigError, to_yaml
from dist_vae.data.stream import ShardStream, read_manifest
from dist_vae.engine import checkpoint
from dist_vae.engine.distributed import make_accelerator
from dist_vae.engine.ema import EMA
from dist_vae.engine.full_state import restore_scaler, scaler_state
from dist_vae.engine.logging import RunLogger
from dist_vae.engine.preemption import (
    REQUEUE_EXIT_CODE,
    PreemptionFlag,
    write_diverged_marker,
    write_done_marker,
    write_requeue_marker,
)
from dist_vae.engine.resize import launched_world_size, resized_config
from dist_vae.engine.rng import preserved_rng, seed_everything_for_step
from dist_vae.engine.schedule import lr_factor
from dist_vae.engine.skip import SpikeDetector, UpdateGate
from dist_vae.engine.update import make_update_path
from dist_vae.files import write_text_atomic
from dist_vae.flops import flops_per_image, peak_flops
from dist_vae.host_memory import return_large_blocks_to_os
from dist_vae.metrics.during_training import check_fid_ready, fid_during_training
from dist_vae.models import build_model, evaluating
from dist_vae.run_dir import CONFIG_FILE, config_dict, newest_verified
from dist_vae.sampling import grid_samples

log = logging.getLogger(__name__)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Update:
    """Outcome of one optimizer step attempt."""

    grad_norm: float  # the real value: NaN or inf for a non-finite update
    applied: bool
    reason: str = ""  # 'nonfinite' or 'spike' when not applied
    preempted: bool = False  # some rank had been signalled (every rank agrees)


@dataclass
class Window:
    """Running sums between two log points (device tensors, read once at the log point)."""

    scalars: dict[str, torch.Tensor] = field(default_factory=dict)
    micro_batches: int = 0
    steps: int = 0
    grad_norm: float = 0.0  # sum of the norms the skip decision read anyway; NaN/inf propagate
    data_wait: float = 0.0
    paused: float = 0.0  # evaluation, sampling, checkpoints: not part of the training rate
    started: float = field(default_factory=time.perf_counter)

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.scalars[name] = self.scalars[name] + value if name in self.scalars else value


def per_rank_batch(cfg: Config) -> int:
    """The per-rank micro-batch (one key, data.batch_size; kept as a function for the tools)."""
    return cfg.data.batch_size


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


class Trainer:
    def __init__(self, cfg: Config, preemption: PreemptionFlag | None = None) -> None:
        """`preemption`: a flag the caller installed even earlier (train.py, before its imports);
        otherwise the handlers go in first thing here, so a signal during start-up is not lost."""
        self.preemption = preemption or PreemptionFlag().install()
        try:
            self._setup(cfg)
        except BaseException:
            self.preemption.restore()
            raise

    def _setup(self, cfg: Config) -> None:
        self.run_dir = Path(cfg.run_dir)
        resume_from = checkpoint.resolve_resume(cfg.resume, self.run_dir)
        read_manifest(cfg.data.path)  # a wrong data.path fails before any process group exists
        if cfg.eval.fid_every:
            check_fid_ready(cfg)  # no [metrics] extra or Inception file: exit 2 now, not at the first FID
        # Another world size than the checkpoint's: train.resize settles the batch before DeepSpeed reads it.
        cfg, self.resize = resized_config(cfg, per_rank_batch(cfg), resume_from, launched_world_size())
        self.cfg = cfg
        self.accelerator = make_accelerator(cfg)
        acc = self.accelerator
        if acc.device.type == "cpu":
            return_large_blocks_to_os()  # the activations live in host memory (host_memory.py)
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
        t = cfg.train
        self.ema = EMA(model, t.ema_decay, acc.device) if t.ema_decay > 0 else None
        # perf/mfu's numerator, counted once on fake tensors (seconds) before compile and wrapping.
        self.peak_flops = peak_flops(acc.device, _DTYPES[t.precision], t.peak_flops)
        self.flops_per_image = flops_per_image(model, cfg.data.resolution) if self.peak_flops else 0.0
        if t.compile:
            model.compile()  # in place: parameter names, checkpoints and param_groups() stay as they are
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.raw_model = acc.unwrap_model(self.model)
        self.update_path = make_update_path(acc, self.model, optimizer, t.grad_clip)
        spikes = SpikeDetector(t.spike_window, t.spike_k, t.spike_warmup, t.max_consecutive_skips)
        self.gate = UpdateGate(spikes, t.max_nonfinite_skips)
        self.data_skipped_before = {"shards": 0, "samples": 0}  # by the runs this one resumes
        self.step = 0

        self.stream = ShardStream(
            cfg.data, "train", acc.process_index, acc.num_processes, cfg.seed,
            batch_size=self.batch_size, device=acc.device,
        )  # fmt: skip
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
        if acc.is_main_process and self.resize.line():
            print(self.resize.line(), file=sys.stderr)
        self.logger = RunLogger(self.run_dir, t.steps, self.step, enabled=acc.is_main_process)
        self.logger.scalars(self.resize.scalars(), self.step)

    # --- state ---------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        """What the checkpoint keeps beside weights and optimizer (JSON). Collective: it sums the
        data stream's counts over ranks."""
        acc = self.accelerator
        meta = {
            "config": config_dict(self.cfg),
            "global_batch": self.batch_size * acc.num_processes * self.cfg.train.accumulate,
            "reference_global_batch": self.resize.reference_global_batch,
            "data": self.stream.state_dict(),
            **self.gate.state_dict(),
        }
        meta["skipped"] = {**meta["skipped"], **self._data_skipped()}
        return meta

    def _load_trainer_state(self, step: int, meta: dict[str, Any]) -> None:
        self.step = step
        self.stream.load_state_dict(meta["data"])
        self.gate.load_state_dict(meta)
        self.data_skipped_before = {key: int(meta["skipped"][key]) for key in self.data_skipped_before}

    def _data_skipped(self) -> dict[str, int]:
        """Bad shards and replaced samples met since the run began, summed over ranks (collective)."""
        acc, mine = self.accelerator, self.stream.skipped
        counts = torch.tensor([mine[key] for key in self.data_skipped_before], device=acc.device)
        if acc.num_processes > 1:
            dist.all_reduce(counts)
        return {
            key: self.data_skipped_before[key] + n
            for key, n in zip(self.data_skipped_before, counts.tolist(), strict=True)
        }

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

    def _agree(self, values: list[torch.Tensor]) -> list[float]:
        """Every rank's maximum of each value, read on the host: the step's one device read."""
        votes = torch.stack([v.float().reshape(()) for v in values])
        if self.accelerator.num_processes > 1:
            dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        return votes.tolist()

    def _update(self, loss: torch.Tensor) -> Update:
        """Decide on the accumulated gradients (identically on every rank) and apply or discard them."""
        norm = self.update_path.grad_norm()
        finite = torch.isfinite(norm)
        requested = torch.tensor(float(self.preemption.requested), device=norm.device)
        nonfinite, agreed_norm, bad_loss, preempted, value = self._agree(
            [~finite, torch.where(finite, norm, 0.0), ~torch.isfinite(loss), requested, norm]
        )
        # Under fp16 a non-finite gradient with a finite loss is loss-scale overflow, not divergence.
        diverging = bool(bad_loss) or self.cfg.train.precision != "fp16"
        reason = self.gate.decide(self.step + 1, agreed_norm, bool(nonfinite), diverging)
        if reason:
            self.update_path.discard(reason == "nonfinite")
        else:
            self.update_path.apply()
            if self.ema is not None:
                self.ema.update()
        return Update(value, not reason, reason, bool(preempted))

    def _fetch(self, batches: Iterator[torch.Tensor], window: Window) -> torch.Tensor:
        started = time.perf_counter()
        with preserved_rng():
            x = next(batches)
        window.data_wait += time.perf_counter() - started
        return x

    def _train_step(self, batches: Iterator[torch.Tensor], window: Window) -> Update:
        seed_everything_for_step(self.cfg.seed, self.step, self.accelerator.process_index)
        self._set_lr()
        accumulate = self.cfg.train.accumulate
        loss = torch.zeros((), device=self.accelerator.device)
        for i in range(accumulate):
            x = self._fetch(batches, window)
            with self.update_path.accumulating(sync=i == accumulate - 1):
                out = self.model(x, step=self.step)
                total = out.total()
                self.update_path.backward(total)
            loss = loss + total.detach()
            window.add("loss", out.loss)
            for name, value in out.scalars.items():
                window.add(name, value)
            for name, value in out.aux_losses.items():
                window.add(f"aux/{name}", value)
            window.micro_batches += 1
        update = self._update(loss)
        window.steps += 1
        window.grad_norm += update.grad_norm
        return update

    # --- evaluation, samples, logs -------------------------------------------------------------
    def _eval_model(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.raw_model

    def _val_stream(self) -> ShardStream:
        acc = self.accelerator
        return ShardStream(
            self.cfg.data, "val", acc.process_index, acc.num_processes, self.cfg.seed,
            batch_size=self.batch_size, training=False, device=acc.device,
        )  # fmt: skip

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean bits/dim over (at most train.eval_batches batches per rank of) the val split."""
        acc, cfg = self.accelerator, self.cfg
        totals = torch.zeros(2, dtype=torch.float64, device=acc.device)
        stream = self._val_stream()
        with evaluating(self._eval_model()) as net, acc.autocast():
            torch.manual_seed(cfg.seed + self.step)
            for i, x in enumerate(stream):
                if i == cfg.train.eval_batches:
                    break
                out = net(x, step=self.step)
                totals[0] += out.scalars["bpd"].double() * x.shape[0]
                totals[1] += x.shape[0]
        totals = acc.reduce(totals, "sum")
        return float(totals[0] / totals[1])

    @torch.no_grad()
    def sample(self) -> None:
        if not self.accelerator.is_main_process:
            return
        generator = torch.Generator(self.accelerator.device).manual_seed(self.cfg.seed + self.step)
        with evaluating(self._eval_model()) as net, self.accelerator.autocast():
            rows = grid_samples(net, self.cfg.train.sample_count, generator=generator)
        self.logger.samples(rows, self.step)

    def _log(self, window: Window) -> float:
        acc = self.accelerator
        names = sorted(window.scalars)
        means = torch.stack([window.scalars[n] / window.micro_batches for n in names]).to(acc.device)
        means = acc.reduce(means, "mean")
        elapsed = time.perf_counter() - window.started - window.paused
        rank_images = window.micro_batches * self.batch_size
        values = {f"train/{n}": v for n, v in zip(names, means.tolist(), strict=True)}
        values["train/grad_norm"] = window.grad_norm / window.steps
        for name, group in zip(self.group_names, self.optimizer.param_groups, strict=True):
            values[f"lr/{name}"] = group["lr"]
        values["perf/img_per_s"] = rank_images * acc.num_processes / elapsed
        values["perf/img_per_s_per_rank"] = rank_images / elapsed
        if self.peak_flops:
            values["perf/mfu"] = values["perf/img_per_s_per_rank"] * self.flops_per_image / self.peak_flops
        values["perf/data_wait_fraction"] = window.data_wait / elapsed
        for reason, count in self.gate.skipped.items():
            values[f"skipped/{reason}"] = count
        for kind, count in self._data_skipped().items():
            values[f"data/skipped_{kind}"] = count
        if acc.scaler is not None:
            values["train/loss_scale"] = acc.scaler.get_scale()
        self.logger.scalars(values, self.step)
        return values["train/loss"]

    # --- the loop ------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to train.steps (exit code 0) or until preempted (REQUEUE_EXIT_CODE); raises
        TrainingDiverged after train.max_nonfinite_skips non-finite updates in a row."""
        acc, t = self.accelerator, self.cfg.train
        try:
            requested = torch.tensor(float(self.preemption.requested), device=acc.device)
            if self._agree([requested])[0]:
                return self._requeue()  # signalled during start-up: nothing new to save
            batches = iter(self.stream)
            window = Window()
            while self.step < t.steps:
                update = self._train_step(batches, window)
                self.step += 1
                diverged = self.gate.diverged
                if diverged or self.step % t.log_every == 0 or self.step == t.steps:
                    self.logger.progress(self.step, self._log(window))
                    window = Window()
                else:
                    self.logger.progress(self.step, None)
                if diverged:  # every rank decided the same: all stop here, saving nothing
                    last = newest_verified(self.run_dir)
                    error = self.gate.divergence(str(last) if last else "none (no checkpoint was written)")
                    if acc.is_main_process:
                        write_diverged_marker(self.run_dir, self.step, str(error))
                    raise error
                paused = time.perf_counter()
                if self.validate and self.step % t.eval_every == 0:
                    self.logger.scalars({"val/bpd": self.evaluate()}, self.step)
                if self.cfg.eval.fid_every and self.step % self.cfg.eval.fid_every == 0:
                    quality = fid_during_training(self._eval_model(), self.cfg, self.step, acc.device)
                    self.logger.scalars(quality, self.step)
                if self.step % t.sample_every == 0:
                    self.sample()
                if update.preempted or self.step % t.checkpoint_every == 0 or self.step == t.steps:
                    self.save()
                window.paused += time.perf_counter() - paused
                if update.preempted:
                    return self._requeue()
            if acc.is_main_process:
                write_done_marker(self.run_dir, self.step)
            acc.wait_for_everyone()
            return 0
        finally:
            self.preemption.restore()
            self.logger.close()
            acc.end_training()

    def _requeue(self) -> int:
        acc = self.accelerator
        if acc.is_main_process:
            write_requeue_marker(self.run_dir, self.step, self.preemption.signal_name or "peer")
        # No rank exits before the marker exists: a launcher that exits early can make the cluster
        # kill the other nodes (srun --kill-on-bad-exit) before rank 0 writes it.
        acc.wait_for_everyone()
        return REQUEUE_EXIT_CODE
