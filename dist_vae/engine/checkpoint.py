"""Atomic, complete checkpoints under RUN_DIR/checkpoints/step-%08d/.

Every rank writes into `.tmp-step-%08d/`: Accelerate's `save_state` (model, optimizer, loss scaler,
and the python/numpy/torch RNG states of each rank; under DeepSpeed the engine's own sharded
checkpoint) plus our `trainer.pt` (rank 0: step, EMA, skip statistics) and `rank-%05d.pt` (each
rank: its data-stream position). Only when all ranks are done does rank 0 write the `COMPLETE`
marker and rename the directory, so a kill at any moment leaves either the previous checkpoints or
the new one; older checkpoints are pruned after the rename. Anything else under checkpoints/ is
ignored by `latest_complete` and removed by `clean_partial`.

`load_run` reads a run back for the tools (sampling, evaluation), which need only weights: the EMA
copy in trainer.pt (fp32, the same under every backend) or the weights Accelerate saved.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from dist_vae.config import Config, ConfigError, load_config
from dist_vae.files import fsync_dir
from dist_vae.models import build_model

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


_WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")


@dataclass
class LoadedRun:
    cfg: Config
    model: nn.Module  # in eval mode
    step: int
    checkpoint: Path
    ema: bool


def load_run(run_dir: str | Path, ema: bool | None = None, device: str | torch.device = "cpu") -> LoadedRun:
    """The run's config.yaml and its newest complete checkpoint's weights, for the tools: the EMA
    ones when `ema` (None: when the run kept them, as the trainer's own samples do), in eval mode
    on `device`."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: no config.yaml (written by dist_vae/train.py)")
    cfg = load_config(config_path)
    path = latest_complete(run_dir)
    if path is None:
        raise ConfigError(
            f"{run_dir}/checkpoints holds no complete checkpoint (step-*/ with a COMPLETE marker)"
        )
    trainer_state = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=False)
    model = build_model(cfg.model, cfg.data.resolution)
    if ema is None:
        ema = trainer_state.get("ema") is not None
    if ema:
        if trainer_state.get("ema") is None:
            raise ConfigError(f"{path} has no EMA weights (the run used train.ema_decay=0); drop --ema")
        state = trainer_state["ema"]["model"]
    else:
        state = _trained_weights(path)
    model.load_state_dict(state)
    return LoadedRun(cfg, model.to(device).eval(), int(trainer_state["step"]), path, ema)


def _trained_weights(path: Path) -> dict[str, torch.Tensor]:
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(path / name)
            return torch.load(path / name, map_location="cpu", weights_only=True)
    raise ConfigError(
        f"{path} holds none of {list(_WEIGHT_FILES)} (a DeepSpeed checkpoint keeps sharded weights): "
        "use the EMA weights (--ema) or convert it with DeepSpeed's zero_to_fp32.py"
    )
