"""The trainer's side of the checkpoint component: the checkpoint a run resumes and the batch it
resumes with, the run directory claimed at start, the config.yaml that never runs ahead of the newest
checkpoint (a changed configuration waits in config.pending.yaml until a checkpoint trained with it
exists), what a checkpoint keeps beside weights and optimizer (the meta), and the marker a stopped
run leaves. The only engine module that calls dist_vae/checkpoint/.

Resuming on another number of processes (`train.resize`: keep_global_batch or scale_lr) is told in
docs/training.md; every learning rate in use is the configured one times global batch / reference
global batch, so a run whose world size and batch give the checkpoint's global batch is bit-exact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from tqdm import tqdm

from dist_vae import checkpoint
from dist_vae.config import Config, ConfigError, to_yaml
from dist_vae.distributed import rank0_says, spread
from dist_vae.engine.backend import Backend
from dist_vae.engine.feeds import Streams
from dist_vae.engine.step import TrainingDiverged, UpdateGate
from dist_vae.engine.stops import write_diverged_marker, write_done_marker, write_stop_marker
from dist_vae.errors import CheckpointError, ExitCode
from dist_vae.files import fsync_dir, write_text_atomic
from dist_vae.run_layout import RunDir


@dataclass(frozen=True)
class Resize:
    """How this run's batch and learning rates relate to the checkpoint it resumes (or starts afresh)."""

    policy: str
    step: int
    world: tuple[int, int]  # (checkpoint, this run)
    batch: tuple[int, int]  # per-rank batch (configured, used)
    accumulate: tuple[int, int]  # (configured, used)
    global_batch: tuple[int, int]  # (checkpoint, this run)
    reference_global_batch: int  # the global batch the run started with: the configured LRs' own

    @property
    def lr_scale(self) -> float:
        return self.global_batch[1] / self.reference_global_batch

    def line(self) -> str:
        """The one line rank 0 prints on resume; empty when the run continues unchanged."""
        (old_w, w), (old_g, g) = self.world, self.global_batch
        pairs = (("batch", self.batch), ("accumulate", self.accumulate))
        changes = [f"{name} {x} -> {y}" for name, (x, y) in pairs if x != y]
        if old_w == w and not changes and self.lr_scale == 1.0:
            return ""
        text = f"resumed step {self.step} on world size {old_w} -> {w}: {self.policy}, global batch "
        text += (
            f"{g}" if old_g == g else f"{old_g} -> {g}"
        ) + f" = {w} x {self.batch[1]} x {self.accumulate[1]}"
        if changes:
            text += f" ({', '.join(changes)})"
        if self.lr_scale != 1.0:
            text += f", lr x {self.lr_scale:g} ({g} / {self.reference_global_batch}, the first global batch)"
        return text

    def scalars(self) -> dict[str, float]:
        return {
            "run/world_size": self.world[1],
            "run/global_batch": self.global_batch[1],
            "run/lr_scale": self.lr_scale,
        }


def launched_world_size() -> int:
    """The number of processes the launcher started (torchrun and DeepSpeed set WORLD_SIZE), known
    before the process group exists, so that the batch is settled before the Accelerator reads it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _keep(global_batch: int, world: int, batch: int, path: Path) -> tuple[int, int]:
    """(per-rank batch, accumulate) giving `global_batch` on `world` processes, batch at most `batch`."""
    if global_batch % world:
        raise ConfigError(
            f"train.resize=keep_global_batch cannot keep the global batch {global_batch} of {path} "
            f"on {world} processes: {global_batch} is not a multiple of {world}; world sizes that keep it: "
            f"{_divisors(global_batch)}; or set train.resize=scale_lr to keep data.batch_size={batch} and "
            "scale the learning rates"
        )
    per_rank = global_batch // world
    fitting = max(d for d in _divisors(per_rank) if d <= batch)
    return fitting, per_rank // fitting


def resized_config(cfg: Config, batch: int, resume_from: Path | None, world: int) -> tuple[Config, Resize]:
    """`cfg` with the per-rank batch (`batch` as configured) and train.accumulate this run uses, and
    the Resize that says how; ConfigError before anything is written when the policy cannot hold."""
    accumulate = cfg.train.accumulate
    configured = world * batch * accumulate
    if resume_from is None:
        return cfg, Resize(cfg.train.resize, 0, (world, world), (batch, batch), (accumulate, accumulate),
                           (configured, configured), configured)  # fmt: skip
    state = checkpoint.read_json(resume_from / checkpoint.STATE_FILE)
    meta: dict[str, Any] = state.get("meta", {})
    saved = meta.get("global_batch")
    if not isinstance(saved, int) or not isinstance(state.get("world_size"), int):
        raise CheckpointError(
            f"{resume_from / checkpoint.STATE_FILE} lacks world_size or meta.global_batch (integers)"
        )
    reference = meta.get("reference_global_batch", saved)
    new_batch, new_accumulate = batch, accumulate
    if cfg.train.resize == "keep_global_batch" and configured != saved:
        new_batch, new_accumulate = _keep(saved, world, batch, resume_from)
    resize = Resize(
        cfg.train.resize, state["step"], (state["world_size"], world), (batch, new_batch),
        (accumulate, new_accumulate), (saved, world * new_batch * new_accumulate), reference,
    )  # fmt: skip
    if (new_batch, new_accumulate) == (batch, accumulate):
        return cfg, resize
    data = dataclasses.replace(cfg.data, batch_size=new_batch)
    train = dataclasses.replace(cfg.train, accumulate=new_accumulate)
    return dataclasses.replace(cfg, data=data, train=train), resize


@dataclass(frozen=True)
class ConfigChange:
    """The keys this run changed against the checkpoint of `step` it resumes: {key: (old, new)}."""

    step: int
    changes: dict[str, tuple[Any, Any]]

    def lines(self) -> list[str]:
        return [f"{key}: {old} -> {new} from step {self.step}" for key, (old, new) in self.changes.items()]


def record_config(run: RunDir, cfg: Config, change: ConfigChange, finished: bool) -> None:
    """Rank 0 at start: an unchanged (or new) configuration is config.yaml now; a changed one waits in
    the pending file, unless the run has nothing left to train (then it never trains anything)."""
    if not change.changes:
        write_text_atomic(run.config, to_yaml(cfg))
    elif not finished:
        write_text_atomic(run.pending_config, to_yaml(cfg))
        return
    run.pending_config.unlink(missing_ok=True)


def promote_config(run: RunDir, change: ConfigChange, saved_step: int) -> None:
    """Rank 0, once the checkpoint of `saved_step` (trained with the changed configuration) is
    complete: the pending file becomes config.yaml and the change joins the history."""
    os.replace(run.pending_config, run.config)
    fsync_dir(run.root)
    entry = {
        "from_step": change.step,
        "checkpoint_step": saved_step,
        "time": round(time.time()),
        "changes": {key: list(pair) for key, pair in change.changes.items()},
    }
    # One short write with O_APPEND: a crash leaves whole lines, at worst a torn last one.
    with open(run.config_changes, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def resume_path(cfg: Config) -> Path | None:
    """The checkpoint this run continues (train.resume), or None for a new run."""
    return checkpoint.resolve_resume(cfg.resume, Path(cfg.run_dir))


def check_resume(cfg: Config, resume_from: Path | None, step: int) -> ConfigChange:
    """Refuse a resume that cannot work; the keys changed against the checkpoint of `step`."""
    if resume_from is None:
        return ConfigChange(step, {})
    checkpoint.check_resume(resume_from, cfg)
    return ConfigChange(step, checkpoint.config_changes(resume_from, cfg))


def claim_run_dir(acc: Accelerator, cfg: Config, change: ConfigChange, refused: str | None) -> None:
    """Every rank learns whether rank 0 was `refused` the run directory's lease (ConfigError naming the
    holder, on every rank) and whether every rank resumes the same step (else a ConfigError); then rank
    0 clears a killed save's leftovers and records the config this run trains with, and every rank
    waits for it. A refused resume (`check_resume`) never gets here, leaving config.yaml as it was."""
    refused = rank0_says(acc, refused)
    if refused is not None:
        raise ConfigError(refused)
    low, high = spread(acc, change.step)  # each rank chose its checkpoint alone, before the group formed
    if low != high:
        raise ConfigError(
            f"the ranks found different checkpoints to resume in run_dir {cfg.run_dir} (steps {low} to "
            f"{high}): every node must see it on one shared file system, without stale listings"
        )
    run = RunDir(cfg.run_dir)
    if acc.is_main_process:
        checkpoint.clean_partial(run.root)
        try:
            record_config(run, cfg, change, finished=change.step >= cfg.train.steps)
        except OSError as exc:  # read-only or full file system: exit 2, like a failed checkpoint
            raise ConfigError(f"run_dir {run.root} is not writable: {exc.strerror} ({exc.filename})") from exc
    acc.wait_for_everyone()


class Checkpointer:
    """Saves and restores the whole training state (the backend's, the data position, the update gate);
    every rank takes part. `pending`: the changed configuration config.yaml waits to take."""

    def __init__(
        self, cfg: Config, backend: Backend, streams: Streams, gate: UpdateGate, reference_global_batch: int,
        pending: ConfigChange | None,
    ) -> None:  # fmt: skip
        self.cfg, self.backend, self.streams, self.gate = cfg, backend, streams, gate
        self.reference_global_batch, self.pending = reference_global_batch, pending
        self.run = RunDir(cfg.run_dir)
        self.saved = 0  # the step of the newest checkpoint saved or restored (0: a fresh start's)

    def meta(self) -> dict[str, Any]:
        """What the checkpoint keeps beside weights and optimizer (JSON). Collective: it sums the
        data stream's counts over ranks."""
        world = self.backend.accelerator.num_processes
        meta = {
            "config": checkpoint.config_dict(self.cfg),
            "global_batch": self.streams.batch_size * world * self.cfg.train.accumulate,
            "reference_global_batch": self.reference_global_batch,
            "data": self.streams.train.state_dict(),
            **self.gate.state_dict(),
        }
        meta["skipped"] = {**meta["skipped"], **self.streams.skipped()}
        return meta

    def save(self, step: int) -> Path:
        b = self.backend
        path = checkpoint.save_checkpoint(
            b.accelerator, self.run.root, step, model=b.model, optimizer=b.optimizer, ema=b.ema,
            scaler_state=checkpoint.scaler_state(b.update_path.scaler), meta=self.meta(),
            keep=self.cfg.train.keep_checkpoints,
        )  # fmt: skip
        if self.pending is not None and b.accelerator.is_main_process:
            promote_config(self.run, self.pending, step)
        self.pending, self.saved = None, step
        return path

    def restore(self, path: Path) -> int:
        """Load `path` into the backend, the data position and the skip state; its step."""
        b = self.backend
        loaded = checkpoint.load_checkpoint(
            b.accelerator, path, model=b.model, optimizer=b.optimizer, ema=b.ema
        )
        checkpoint.restore_scaler(b.update_path.scaler, loaded.scaler_state)
        self.streams.load_state_dict(loaded.meta)
        self.gate.load_state_dict(loaded.meta)
        self.saved = loaded.step
        return loaded.step

    def diverged(self, step: int) -> TrainingDiverged:
        """The error to raise, naming the last good checkpoint; rank 0 leaves the diverged marker."""
        last = checkpoint.newest_verified(self.run.root)
        error = self.gate.divergence(str(last) if last else "none (no checkpoint was written)")
        if self.backend.accelerator.is_main_process:
            write_diverged_marker(self.run, step, str(error))
        return error

    def requeue(self, step: int, signal_name: str | None, interrupted: bool = False) -> ExitCode:
        """Leave the requeue marker (the reason: this rank's signal, or 'peer' when another rank's)
        and say so in one line; ExitCode.REQUEUE once every rank knows it exists. `interrupted` (a
        Ctrl-C, agreed by every rank): the same line, no marker, ExitCode.INTERRUPTED."""
        acc = self.backend.accelerator
        if interrupted:
            signal_name = "SIGINT"
        if acc.is_main_process:
            write_stop_marker(self.run, step, signal_name or "peer", interrupted)
            saved = checkpoint.complete_checkpoints(self.run.root)
            where = f"checkpoint {saved[-1][1]}" if saved else "no checkpoint yet"
            tqdm.write(  # on a line of its own, not after the open progress bar
                f"stopped by {signal_name or 'a signal to another rank'} at step {step}; {where}; "
                "run the same command again to resume",
                file=sys.stderr,
            )
        # No rank exits before the marker exists: a launcher that exits early can make the cluster
        # kill the other nodes (srun --kill-on-bad-exit) before rank 0 writes it.
        acc.wait_for_everyone()
        return ExitCode.INTERRUPTED if interrupted else ExitCode.REQUEUE

    def done(self, step: int) -> None:
        acc = self.backend.accelerator
        if acc.is_main_process:
            write_done_marker(self.run, step)
        acc.wait_for_everyone()
