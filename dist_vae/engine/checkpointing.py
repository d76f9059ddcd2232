"""The trainer's side of the checkpoint component: the run directory claimed at start, what a
checkpoint keeps beside weights and optimizer (the meta), saving and restoring it, and the marker a
run leaves when it stops. The only engine module that calls the component, so moving it changes the
imports here alone."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from tqdm import tqdm

from dist_vae import checkpoint
from dist_vae.checkpoint import (
    complete_checkpoints,
    config_dict,
    newest_verified,
    restore_scaler,
    scaler_state,
)
from dist_vae.config import Config, ConfigError
from dist_vae.engine.backend import Backend
from dist_vae.engine.preemption import (
    REQUEUE_EXIT_CODE,
    write_diverged_marker,
    write_done_marker,
    write_requeue_marker,
)
from dist_vae.engine.resize import Resize
from dist_vae.engine.run_config import ConfigChange, promote_config, record_config
from dist_vae.engine.skip import TrainingDiverged, UpdateGate
from dist_vae.engine.streams import Streams


def resume_path(cfg: Config) -> Path | None:
    """The checkpoint this run continues (train.resume), or None for a new run."""
    return checkpoint.resolve_resume(cfg.resume, Path(cfg.run_dir))


def claim_run_dir(acc: Accelerator, cfg: Config, resume_from: Path | None, step: int) -> ConfigChange:
    """Refuse a resume that cannot work, then (rank 0) clear a killed save's leftovers and record the
    config this run trains with (run_config.py); a refused resume leaves config.yaml as it was.
    `step`: the step resumed from. Returns the keys changed against the checkpoint."""
    run_dir = Path(cfg.run_dir)
    change = ConfigChange(step, {})
    if resume_from is not None:
        checkpoint.check_resume(resume_from, cfg)
        change = ConfigChange(step, checkpoint.config_changes(resume_from, cfg))
    if acc.is_main_process:
        checkpoint.clean_partial(run_dir)
        try:
            record_config(run_dir, cfg, change, finished=step >= cfg.train.steps)
        except OSError as exc:  # read-only or full file system: exit 2, like a failed checkpoint
            raise ConfigError(f"run_dir {run_dir} is not writable: {exc.strerror} ({exc.filename})") from exc
    acc.wait_for_everyone()
    return change


class Checkpointer:
    """Saves and restores the whole training state; every rank takes part."""

    def __init__(
        self, cfg: Config, resize: Resize, backend: Backend, streams: Streams, gate: UpdateGate,
        change: ConfigChange,
    ) -> None:  # fmt: skip
        self.cfg, self.resize, self.backend, self.streams, self.gate = cfg, resize, backend, streams, gate
        self.run_dir = Path(cfg.run_dir)
        self.pending = change if change.changes else None  # config.yaml waits for this run's first save

    def meta(self) -> dict[str, Any]:
        """What the checkpoint keeps beside weights and optimizer (JSON). Collective: it sums the
        data stream's counts over ranks."""
        world = self.backend.accelerator.num_processes
        meta = {
            "config": config_dict(self.cfg),
            "global_batch": self.streams.batch_size * world * self.cfg.train.accumulate,
            "reference_global_batch": self.resize.reference_global_batch,
            "data": self.streams.train.state_dict(),
            **self.gate.state_dict(),
        }
        meta["skipped"] = {**meta["skipped"], **self.streams.skipped()}
        return meta

    def save(self, step: int) -> Path:
        b = self.backend
        path = checkpoint.save_checkpoint(
            b.accelerator, self.run_dir, step, model=b.model, optimizer=b.optimizer, ema=b.ema,
            scaler_state=scaler_state(b.model, b.update_path.scaler), meta=self.meta(),
            keep=self.cfg.train.keep_checkpoints,
        )  # fmt: skip
        if self.pending is not None and b.accelerator.is_main_process:
            promote_config(self.run_dir, self.pending, step)
        self.pending = None
        return path

    def restore(self, path: Path) -> int:
        """Load `path` into the backend, the data position and the skip state; its step."""
        b = self.backend
        loaded = checkpoint.load_checkpoint(
            b.accelerator, path, model=b.model, optimizer=b.optimizer, ema=b.ema
        )
        restore_scaler(b.model, b.update_path.scaler, loaded.scaler_state)
        self.streams.load_state_dict(loaded.meta)
        self.gate.load_state_dict(loaded.meta)
        return loaded.step

    def diverged(self, step: int) -> TrainingDiverged:
        """The error to raise, naming the last good checkpoint; rank 0 leaves the diverged marker."""
        last = newest_verified(self.run_dir)
        error = self.gate.divergence(str(last) if last else "none (no checkpoint was written)")
        if self.backend.accelerator.is_main_process:
            write_diverged_marker(self.run_dir, step, str(error))
        return error

    def requeue(self, step: int, signal_name: str | None) -> int:
        """Leave the requeue marker (the reason: this rank's signal, or 'peer' when another rank's)
        and say so in one line; REQUEUE_EXIT_CODE once every rank knows it exists."""
        acc = self.backend.accelerator
        if acc.is_main_process:
            write_requeue_marker(self.run_dir, step, signal_name or "peer")
            saved = complete_checkpoints(self.run_dir)
            where = f"checkpoint {saved[-1][1]}" if saved else "no checkpoint yet"
            tqdm.write(  # on a line of its own, not after the open progress bar
                f"stopped by {signal_name or 'a signal to another rank'} at step {step}; {where}; "
                "run the same command again to resume",
                file=sys.stderr,
            )
        # No rank exits before the marker exists: a launcher that exits early can make the cluster
        # kill the other nodes (srun --kill-on-bad-exit) before rank 0 writes it.
        acc.wait_for_everyone()
        return REQUEUE_EXIT_CODE

    def done(self, step: int) -> None:
        acc = self.backend.accelerator
        if acc.is_main_process:
            write_done_marker(self.run_dir, step)
        acc.wait_for_everyone()
