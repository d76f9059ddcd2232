"""A finished (or running) run directory as a model ready for sampling or evaluation.

The engine's checkpoints are written for resuming training (Accelerate state, optimizer, RNG); the
tools only need weights: the EMA copy kept in the trainer state (fp32, the same under every
backend) or the trained weights Accelerate saved for the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dist_vae.config import Config, ConfigError, load_config
from dist_vae.engine.checkpoint import TRAINER_FILE, latest_complete
from dist_vae.models import build_model

_WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")


@dataclass
class LoadedRun:
    cfg: Config
    model: nn.Module  # in eval mode
    step: int
    checkpoint: Path
    ema: bool


def load_run(run_dir: str | Path, ema: bool = False, device: str | torch.device = "cpu") -> LoadedRun:
    """The run's config.yaml and its newest complete checkpoint's weights (EMA ones when `ema`)."""
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
