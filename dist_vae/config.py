"""Typed run configuration: a dataclass schema, YAML files and dotted `key=value` overrides.

OmegaConf does the merging and type coercion; this module turns its exceptions into one
`ConfigError` that always names the offending key, the value given and what is allowed, and adds the
checks OmegaConf has no notion of (choices, lower bounds: `schema.check_fields`).

The `model` section is the config dataclass of the model `model.kind` names (each model defines its
own, beside its code; `models.model_config_class`), so it holds that model's keys alone. A layer
(file or override) that switches `model.kind` starts the section afresh from the new kind's defaults.
Older versions' files are brought up to date layer by layer in config_migration.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from dist_vae.config_migration import booleans_as_switches, check_removed, drop_other_kinds_defaults
from dist_vae.data.config import DataConfig
from dist_vae.metrics.settings import EvalConfig
from dist_vae.models import default_model_kind, model_config_class, model_kinds
from dist_vae.schema import ConfigError, at_least, between, check_fields, choice
from dist_vae.trackers import LogConfig


@dataclass
class TrainConfig:
    steps: int = at_least(1000, 1)
    precision: str = choice("fp32", "fp32", "bf16", "fp16")
    lr: float = at_least(2.0e-4, 0.0)
    critic_lr: float = at_least(2.0e-4, 0.0)
    weight_decay: float = at_least(0.0, 0.0)
    warmup: int = at_least(100, 0)
    schedule: str = choice("cosine", "constant", "cosine", "linear")
    grad_clip: float = at_least(1.0, 0.0)  # 0 disables clipping
    accumulate: int = at_least(1, 1)
    # On resume with another world size: keep the checkpoint's global batch (adjust accumulate, then
    # the per-rank batch) or keep the per-rank batch and scale the LRs linearly (engine/checkpointing.py).
    resize: str = choice("keep_global_batch", "keep_global_batch", "scale_lr")
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
    # This many non-finite updates in a row end the run: exit code 4, nothing new saved.
    max_nonfinite_skips: int = at_least(10, 1)
    # fp16 loss scaling (the trainer's GradScaler; fp16 is refused under DeepSpeed): the scale doubles
    # after this many updates without overflow; an overflow halves it and skips the update.
    loss_scale_growth_interval: int = at_least(2000, 1)
    # torch.compile the model in place, before DDP/DeepSpeed wrap it. auto: on a GPU only (on the CPU
    # compiling takes minutes and pays back on long runs alone); on: anywhere; off: never.
    compile: str = choice("auto", "auto", "on", "off")
    # Replay the step's forward and backward as CUDA graphs (torch.compile mode="reduce-overhead"):
    # the host no longer issues each operation. GPU only; not under DeepSpeed.
    cuda_graphs: bool = False
    peak_flops: float | None = at_least(None, 0.0)  # FLOP/s of one device for perf/mfu; None: by name
    sample_count: int = at_least(16, 1)  # images in each sample grid
    # Hang watchdog (engine/stops.py), in seconds: a step that reaches no boundary within
    # hang_timeout (None: the larger of 15 minutes and 50x the median of the last 100 step times;
    # 15 minutes before any step is timed), or evaluation, sampling and saving at one boundary that
    # take longer than action_timeout, dump every thread's stack to RUN_DIR/hang/rank-R.txt, exit 5.
    hang_timeout: float | None = at_least(None, 1.0)
    action_timeout: float = at_least(14400.0, 1.0)
    # init_process_group's timeout: a collective waiting this long for a dead peer raises instead of
    # blocking forever.
    collective_timeout: float = at_least(1800.0, 1.0)


@dataclass
class HealthConfig:
    """The posterior-collapse alarm (engine/monitor.py); the health/* logs are always written."""

    kl_threshold: float = at_least(0.01, 0.0)  # nats; a unit whose mean KL is below it carries ~nothing
    collapse_logs: int = at_least(3, 0)  # collapsed log points in a row before the warning; 0: never warn
    units_buffer: int = at_least(256, 2)  # newest posterior means (rank 0's images) for active units


def default_model_config() -> Any:
    """The model section a config that names no kind gets: the registry's default kind's defaults."""
    return model_config_class(default_model_kind())()


@dataclass
class Config:
    run_dir: str = "runs/debug"
    seed: int = 0
    resume: str = "auto"  # auto | never | path of a checkpoint directory
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = field(default_factory=default_model_config)  # the config dataclass of model.kind
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _error_from_omegaconf(exc: OmegaConfBaseException, origin: str, merged: DictConfig) -> ConfigError:
    key = str(getattr(exc, "full_key", None) or "?")
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(merged, parent) if parent else merged
    schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
    if isinstance(exc, ConfigKeyError) or (fields and leaf not in fields):
        where = f" for model.kind={node.kind}" if parent == "model" else ""
        return ConfigError(f"{origin}: unknown key '{key}'{where}; allowed keys here: {sorted(fields)}")
    msg = str(getattr(exc, "msg", exc)).splitlines()[0]
    expected = ""
    if leaf in fields:
        meta = fields[leaf].metadata
        expected = f"one of {list(meta['choices'])}" if "choices" in meta else f"type {fields[leaf].type}"
    return ConfigError(f"{origin}: bad value for '{key}': {msg}; expected {expected or 'a valid value'}")


def _layer_kind(layer: DictConfig, origin: str) -> str | None:
    """The model.kind a layer sets (None: it sets none), checked against the registered kinds."""
    model = layer.get("model") if isinstance(layer, DictConfig) else None
    kind = model.get("kind") if isinstance(model, DictConfig) else None
    if kind is not None and kind not in model_kinds():
        raise ConfigError(f"{origin}: bad value {kind!r} for 'model.kind'; expected one of {model_kinds()}")
    return kind


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Schema defaults <- YAML file <- `key=value` overrides, each layer validated as it is merged."""
    merged = OmegaConf.structured(Config)
    layers: list[tuple[str, Any, bool]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            layers.append((str(path), OmegaConf.load(path), True))
        except Exception as exc:  # yaml errors have no common base worth naming
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (for example train.lr=1e-4)")
        layers.append((f"override {item!r}", OmegaConf.from_dotlist([item]), False))
    for origin, layer, is_file in layers:
        check_removed(layer, origin)
        booleans_as_switches(layer)
        kind = _layer_kind(layer, origin)
        if kind is not None and kind != merged.model.kind:
            merged.model = OmegaConf.structured(model_config_class(kind))
        if is_file:
            drop_other_kinds_defaults(layer, merged.model.kind)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            raise _error_from_omegaconf(exc, origin, merged) from exc
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    check_fields(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    """The fully resolved configuration, as written to RUN_DIR/config.yaml."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
