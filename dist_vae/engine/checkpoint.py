"""Atomic, complete checkpoints under RUN_DIR/checkpoints/step-%08d/.

Every rank writes into `.tmp-step-%08d/`: Accelerate's `save_state` (model, optimizer, loss scaler,
and the python/numpy/torch RNG states of each rank; under DeepSpeed the engine's own sharded
checkpoint) plus our `trainer.pt` (rank 0: step, EMA, skip statistics) and `rank-%05d.pt` (each
rank: its data-stream position). Only when all ranks are done does rank 0 write the `COMPLETE`
marker and rename the directory, so a kill at any moment leaves either the previous checkpoints or
the new one; older checkpoints are pruned after the rename. Anything else under checkpoints/ is
ignored by `latest_complete` and removed by `clean_partial`.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from dist_vae.config import ConfigError
from dist_vae.engine.atomic import fsync_dir

COMPLETE = "COMPLETE"
TRAINER_FILE = "trainer.pt"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / COMPLETE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_complete(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint to start from: `auto` -> newest complete one (or none), `never` -> none, else a path."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_complete(run_dir)
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise ConfigError(
            f"bad value {resume!r} for 'resume': {path} is not a complete checkpoint directory "
            f"(no {COMPLETE} marker); expected auto, never or such a directory"
        )
    return path


def clean_partial(run_dir: Path) -> None:
    """Remove directories left by a save that was killed before its rename (rank 0, before training)."""
    root = checkpoint_root(run_dir)
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and not (_NAME.match(path.name) and (path / COMPLETE).is_file()):
                shutil.rmtree(path, ignore_errors=True)


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    step: int,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    keep: int,
) -> Path:
    """Collective: every rank must call it at the same step. Returns the final directory."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)
    torch.save(rank_state, tmp / _rank_file(accelerator.process_index))
    if accelerator.is_main_process:
        torch.save(trainer_state, tmp / TRAINER_FILE)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.sync()
        (tmp / COMPLETE).write_text(f"step {step}\nranks {accelerator.num_processes}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for _, old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore Accelerate's state in place; return (trainer_state, this rank's state)."""
    ranks = (path / COMPLETE).read_text().split("ranks ")[-1].strip()
    if ranks != str(accelerator.num_processes):
        raise ConfigError(
            f"checkpoint {path} was written by {ranks} processes but this run has "
            f"{accelerator.num_processes}; resume with the same number of processes"
        )
    accelerator.load_state(str(path))
    trainer_state = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=False)
    rank_file = path / _rank_file(accelerator.process_index)
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
    return trainer_state, rank_state
