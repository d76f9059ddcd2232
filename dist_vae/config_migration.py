"""Configs written by older versions, brought to today's schema as each layer (file or override) is
merged, or refused with what replaced them. One entry per old format; each has its test in
tests/test_config_migration.py.

- Removed keys (`train.batch_size`, `data.shuffle_buffer`): refused, naming the key that replaced it.
- `train.compile` was a boolean: true/false (YAML also reads on/off as booleans) load as on/off.
- Model sections from before the per-model configs held every kind's keys: a key of another kind at
  that kind's default is dropped from a file; any other foreign key is refused by the schema.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dist_vae.models import model_config_class, model_kinds
from dist_vae.schema import ConfigError

REMOVED = {
    "train.batch_size": "use data.batch_size, the per-rank micro-batch (one key per meaning)",
    "data.shuffle_buffer": "use data.shuffle_group, the number of shards whose samples are mixed",
}
SWITCHES = ("train.compile",)  # once booleans, now on/off switches


def check_removed(layer: Any, origin: str) -> None:
    for key, instead in REMOVED.items():
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(layer, parent) if parent else layer
        if isinstance(node, DictConfig) and leaf in node:
            raise ConfigError(f"{origin}: key '{key}' was removed; {instead}")


def booleans_as_switches(layer: Any) -> None:
    for key in SWITCHES:
        value = str(OmegaConf.select(layer, key)).lower()  # a bool, or a quoted 'true'/'false'
        if value in ("true", "false"):
            OmegaConf.update(layer, key, "on" if value == "true" else "off")


def drop_other_kinds_defaults(layer: DictConfig, kind: str) -> None:
    """Remove from a file's model section the keys of other kinds that sit at their defaults."""
    model = layer.get("model")
    if not isinstance(model, DictConfig):
        return
    own = {f.name for f in dataclasses.fields(model_config_class(kind))}
    for other in model_kinds():
        defaults = OmegaConf.structured(model_config_class(other))
        for key in [k for k in model if k not in own and k in defaults]:
            if model[key] == defaults[key]:
                del model[key]
