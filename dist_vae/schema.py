"""Field helpers every configuration section uses: the run's (`config.py`) and each model's (beside its
code in `models/`), so that a model's config needs nothing above torch in the layers.

A field's allowed values and bounds are written once, as metadata on the field; `check_fields`
is the one place that enforces them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from dist_vae.errors import ConfigError

__all__ = ["ConfigError", "at_least", "between", "check_fields", "choice"]


def choice(default: Any, *allowed: Any) -> Any:
    """A field whose value must be one of `allowed` (checked after every merge)."""
    return field(default=default, metadata={"choices": allowed})


def at_least(default: Any, minimum: float) -> Any:
    """A numeric field that must be >= `minimum`."""
    return field(default=default, metadata={"min": minimum})


def between(default: Any, low: float, high: float) -> Any:
    """A numeric field that must lie in [low, high]."""
    return field(default=default, metadata={"min": low, "max": high})


def check_fields(obj: Any, prefix: str = "") -> None:
    """Raise ConfigError naming the first field of dataclass `obj` (nested ones too, keys dotted from
    `prefix`) whose value breaks its `choice`, `at_least` or `between` metadata."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_fields(value, key + ".")
            continue
        meta = f.metadata
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"bad value {value!r} for '{key}'; expected one of {list(meta['choices'])}")
        if "min" in meta and value is not None and value < meta["min"]:
            raise ConfigError(f"bad value {value!r} for '{key}'; expected a value >= {meta['min']}")
        if "max" in meta and value is not None and value > meta["max"]:
            raise ConfigError(f"bad value {value!r} for '{key}'; expected a value <= {meta['max']}")
