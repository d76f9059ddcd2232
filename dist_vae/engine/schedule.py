"""Learning-rate factor as a pure function of the step, so a resumed run cannot lose its schedule."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the base LR for the update that takes the run from `step` to `step + 1`.

    Linear warm-up over `warmup` updates, then `constant`, `cosine` (to 0 at `total`) or `linear`
    (to 0 at `total`).
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown LR schedule {kind!r}; expected constant, cosine or linear")
