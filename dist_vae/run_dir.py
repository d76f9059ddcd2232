"""A trained model from a run directory (its layout: dist_vae/run_layout.py's RunDir): the tools
load one with `load_run`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dist_vae.checkpoint import (
    COMPLETE,
    EMA_FILE,
    MODEL_FILE,
    STATE_FILE,
    load_module_state,
    newest_verified,
    read_json,
    read_tensors,
)
from dist_vae.config import Config, ConfigError, load_config
from dist_vae.errors import CheckpointError
from dist_vae.models import build_model
from dist_vae.run_layout import RunDir


@dataclass
class LoadedRun:
    cfg: Config
    model: nn.Module  # in eval mode
    step: int
    checkpoint: Path
    ema: bool


def load_run(run_dir: str | Path, ema: bool | None = None, device: str | torch.device = "cpu") -> LoadedRun:
    """The run's config.yaml and its newest verified checkpoint's weights, for the tools: the EMA
    ones when `ema` (None: when the run kept them, as the trainer's own samples do), in eval mode
    on `device`."""
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise ConfigError(
            f"{run.root} is not a run directory: no {run.config.name} (dist_vae/train.py writes it)"
        )
    cfg = load_config(run.config)
    path = newest_verified(run.root)
    if path is None:
        raise CheckpointError(f"{run.checkpoints} holds no complete checkpoint (step-*/ with {COMPLETE})")
    has_ema = (path / EMA_FILE).is_file()
    ema = has_ema if ema is None else ema
    if ema and not has_ema:
        raise CheckpointError(f"{path} has no EMA weights (the run used train.ema_decay=0); drop --ema")
    file = path / (EMA_FILE if ema else MODEL_FILE)
    model = build_model(cfg.model, cfg.data.resolution)
    load_module_state(model, read_tensors(file), file)
    step = read_json(path / STATE_FILE).get("step")
    return LoadedRun(cfg, model.to(device).eval(), int(step), path, ema)
