"""Typed run configuration: a dataclass schema, YAML files and dotted `key=value` overrides.

OmegaConf does the merging and type coercion; this module turns its exceptions into one
`ConfigError` that always names the offending key, the value given and what is allowed, and adds the
checks OmegaConf has no notion of (choices, lower bounds).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value, key or file that cannot be used; the message says which and why."""


def choice(default: Any, *allowed: Any) -> Any:
    """A field whose value must be one of `allowed` (checked after every merge)."""
    return field(default=default, metadata={"choices": allowed})


def at_least(default: Any, minimum: float) -> Any:
    """A numeric field that must be >= `minimum`."""
    return field(default=default, metadata={"min": minimum})


def between(default: Any, low: float, high: float) -> Any:
    """A numeric field that must lie in [low, high]."""
    return field(default=default, metadata={"min": low, "max": high})


@dataclass
class DataConfig:
    path: str = "data/demo/shards"  # directory holding train-*.tar, val-*.tar and manifest.json
    resolution: int = at_least(32, 8)  # <= the shards' resolution; smaller is resized on the fly
    batch_size: int = at_least(16, 1)  # per rank
    num_workers: int = at_least(2, 0)  # DataLoader workers per rank; a resumed run may change it
    shuffle_group: int = at_least(8, 1)  # shards whose samples are mixed together in an epoch
    random_flip: bool = True


@dataclass
class ModelConfig:
    kind: str = choice("pixel_vae", "pixel_vae", "iterative_vae")
    # --- PixelVAE: encoder + conditional PixelCNN++ decoder (defaults: LSUN 64 px) ---
    reg: str = choice("mmd", "elbo", "none", "mmd", "stein", "adversarial")
    latent_dim: int = at_least(64, 1)
    nr_resnet: int = at_least(5, 1)
    nr_filters: int = at_least(160, 1)
    nr_mix: int = at_least(10, 1)
    n_stages: int = at_least(3, 1)
    dropout: float = between(0.5, 0.0, 0.99)
    encoder_channels: int = at_least(64, 1)
    # InfoVAE weighting: loss = rec + (1 - alpha) * KL + (alpha + lambda_ - 1) * D(q(z) || p(z)).
    # alpha = 1 drops the per-sample KL, which with a PixelCNN++ decoder makes z carry nothing.
    alpha: float = 1.0
    lambda_: float = 1000.0
    critic_hidden: int = at_least(256, 1)
    # --- Iterative latent-injection VAE (defaults: LSUN 256 px, the seed's sizes) ---
    refine_steps: int = at_least(8, 1)  # T; 1 with T-times larger latent_dims is the single-step baseline
    # One latent per level at the len(latent_dims) coarsest levels, the last at 4 px; drawn afresh per step.
    latent_dims: list[int] = field(default_factory=lambda: [20, 30, 30, 30])
    mode: str = choice("greedy", "greedy", "joint")  # greedy stops gradients between steps (the original)
    channels: int = at_least(64, 1)  # width at 64 px; x2 per halving up to x4, /2 per doubling above 64 px
    rec_weight: float = at_least(16.0, 1.0e-3)  # 1 / (2 sigma^2) of the fixed-variance Gaussian decoder
    kl_warmup: float = at_least(1.0e4, 0.0)  # KL weight is 1 - exp(-step / kl_warmup); 0 disables warm-up
    blocks: int = at_least(1, 1)  # residual blocks per resolution level in every encoder and generator


@dataclass
class TrainConfig:
    steps: int = at_least(1000, 1)
    batch_size: int | None = None  # per rank; None takes data.batch_size
    precision: str = choice("fp32", "fp32", "bf16", "fp16")
    lr: float = at_least(2.0e-4, 0.0)
    critic_lr: float = at_least(2.0e-4, 0.0)
    weight_decay: float = at_least(0.0, 0.0)
    warmup: int = at_least(100, 0)
    schedule: str = choice("cosine", "constant", "cosine", "linear")
    grad_clip: float = at_least(1.0, 0.0)  # 0 disables clipping
    accumulate: int = at_least(1, 1)
    checkpoint_every: int = at_least(500, 1)
    keep_checkpoints: int = at_least(3, 1)
    eval_every: int = at_least(1000, 1)
    eval_batches: int = at_least(8, 1)
    sample_every: int = at_least(1000, 1)
    log_every: int = at_least(10, 1)
    gradient_checkpointing: bool = False
    ema_decay: float = between(0.999, 0.0, 1.0)  # 0 disables EMA
    # Loss-spike skipping: an update is skipped when its gradient norm exceeds the running median of
    # the last `spike_window` norms by more than `spike_k` median absolute deviations (floored at half
    # the median: with k=10 a spike is a norm above 6x the recent median).
    spike_window: int = at_least(100, 0)  # 0 disables spike skipping
    spike_k: float = at_least(10.0, 0.0)
    spike_warmup: int = at_least(20, 1)  # norms needed before the threshold applies
    max_consecutive_skips: int = at_least(5, 0)  # after this many, the next update is applied anyway
    sample_count: int = at_least(16, 1)  # images in each sample grid


@dataclass
class Config:
    run_dir: str = "runs/debug"
    seed: int = 0
    resume: str = "auto"  # auto | never | path of a checkpoint directory
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _schema_at(dotted: str) -> type | None:
    """The dataclass that holds the keys under `dotted` ('' is the root), or None."""
    schema: type = Config
    for part in filter(None, dotted.split(".")):
        fields = {f.name: f for f in dataclasses.fields(schema)}
        if part not in fields or not dataclasses.is_dataclass(fields[part].default_factory):  # type: ignore[arg-type]
            return None
        schema = fields[part].default_factory  # type: ignore[assignment]
    return schema


def _error_from_omegaconf(exc: OmegaConfBaseException, origin: str) -> ConfigError:
    key = str(getattr(exc, "full_key", None) or "?")
    parent, _, leaf = key.rpartition(".")
    schema = _schema_at(parent)
    fields = {f.name: f for f in dataclasses.fields(schema)} if schema else {}
    if isinstance(exc, ConfigKeyError) or (schema and leaf not in fields):
        return ConfigError(f"{origin}: unknown key '{key}'; allowed keys here: {sorted(fields)}")
    msg = str(getattr(exc, "msg", exc)).splitlines()[0]
    expected = ""
    if leaf in fields:
        meta = fields[leaf].metadata
        expected = f"one of {list(meta['choices'])}" if "choices" in meta else f"type {fields[leaf].type}"
    return ConfigError(f"{origin}: bad value for '{key}': {msg}; expected {expected or 'a valid value'}")


def _check_bounds(obj: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_bounds(value, key + ".")
            continue
        meta = f.metadata
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"bad value {value!r} for '{key}'; expected one of {list(meta['choices'])}")
        if "min" in meta and value is not None and value < meta["min"]:
            raise ConfigError(f"bad value {value!r} for '{key}'; expected a value >= {meta['min']}")
        if "max" in meta and value is not None and value > meta["max"]:
            raise ConfigError(f"bad value {value!r} for '{key}'; expected a value <= {meta['max']}")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Schema defaults <- YAML file <- `key=value` overrides, each layer validated as it is merged."""
    merged = OmegaConf.structured(Config)
    layers: list[tuple[str, Any]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            layers.append((str(path), OmegaConf.load(path)))
        except Exception as exc:  # yaml errors have no common base worth naming
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (for example train.lr=1e-4)")
        layers.append((f"override {item!r}", OmegaConf.from_dotlist([item])))
    for origin, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            raise _error_from_omegaconf(exc, origin) from exc
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    _check_bounds(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    """The fully resolved configuration, as written to RUN_DIR/config.yaml."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
