"""Model registry: the engine knows models only through `build_model` and `LossOutput`."""

from __future__ import annotations

from torch import nn

from dist_vae.config import ConfigError, ModelConfig
from dist_vae.models.output import LossOutput

__all__ = ["LossOutput", "build_model"]


def build_model(cfg: ModelConfig, resolution: int, gradient_checkpointing: bool = False) -> nn.Module:
    """Instantiate `cfg.kind` for square images of side `resolution`."""
    if cfg.kind == "pixel_vae":
        from dist_vae.models.pixel_vae import PixelVAE

        return PixelVAE.from_config(cfg, resolution, gradient_checkpointing)
    if cfg.kind == "iterative_vae":
        from dist_vae.models.iterative_vae import IterativeVAE

        return IterativeVAE.from_config(cfg, resolution, gradient_checkpointing)
    raise ConfigError(
        f"bad value {cfg.kind!r} for 'model.kind'; expected one of ['pixel_vae', 'iterative_vae']"
    )
