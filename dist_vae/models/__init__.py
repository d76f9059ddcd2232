"""Model registry: `model.kind` -> the model's config dataclass and its class.

The engine, the config loader and the tools know models only through this registry, `LossOutput` and
the `GenerativeModel` protocol. A new model registers itself here (or, in a test, through
`register_model`) and touches nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dist_vae.models.iterative_vae import IterativeVAE, IterativeVAEConfig
from dist_vae.models.output import LossOutput
from dist_vae.models.pixel_vae import PixelVAE, PixelVAEConfig
from dist_vae.models.protocol import GenerativeModel, Posterior, evaluating
from dist_vae.schema import ConfigError

__all__ = [
    "GenerativeModel",
    "LossOutput",
    "Posterior",
    "build_model",
    "default_model_kind",
    "evaluating",
    "model_config_class",
    "model_kinds",
    "register_model",
]


@dataclass(frozen=True)
class _Entry:
    config: type
    build: Callable[[Any, int, bool], GenerativeModel]


_REGISTRY: dict[str, _Entry] = {}
_PROTOCOL_MEMBERS = sorted(name for name in dir(GenerativeModel) if not name.startswith("_")) + sorted(
    GenerativeModel.__annotations__
)


def register_model(kind: str, config: type, build: Callable[[Any, int, bool], GenerativeModel]) -> None:
    """Make `model.kind=<kind>` select the dataclass `config` (its own `kind` field defaults to `kind`)
    and `build(cfg, resolution, gradient_checkpointing)`."""
    default = getattr(config(), "kind", None)
    if default != kind:
        raise ValueError(f"{config.__name__}.kind must default to {kind!r}, got {default!r}")
    _REGISTRY[kind] = _Entry(config, build)


def model_kinds() -> list[str]:
    return list(_REGISTRY)


def default_model_kind() -> str:
    """The kind a config that names none gets: the first registered."""
    return next(iter(_REGISTRY))


def model_config_class(kind: str) -> type:
    """The config dataclass of `kind`; ConfigError naming the known kinds otherwise."""
    if kind not in _REGISTRY:
        raise ConfigError(f"bad value {kind!r} for 'model.kind'; expected one of {model_kinds()}")
    return _REGISTRY[kind].config


def build_model(cfg: Any, resolution: int, gradient_checkpointing: bool = False) -> GenerativeModel:
    """Instantiate the model `cfg.kind` (cfg: its config dataclass) for square images of side `resolution`."""
    model_config_class(cfg.kind)
    model = _REGISTRY[cfg.kind].build(cfg, resolution, gradient_checkpointing)
    if not isinstance(model, GenerativeModel):
        missing = [name for name in _PROTOCOL_MEMBERS if not hasattr(model, name)]
        raise TypeError(f"model.kind={cfg.kind} built {type(model).__name__}, which lacks {missing}")
    return model


register_model("pixel_vae", PixelVAEConfig, PixelVAE)
register_model("iterative_vae", IterativeVAEConfig, IterativeVAE)
