"""Adaptive loss-spike detection on gradient norms.

A fixed threshold can reject every update once the norm drifts past it (openai/vdvae#25). Here the
threshold follows the run: median + k * MAD of the recent norms. Every finite norm enters the window,
skipped ones too: median and MAD ignore isolated outliers, while a lasting change of level (the norms
of a young run grow several-fold during warm-up) moves them within half a window instead of being
rejected as a string of spikes. The MAD is floored at half the median, so with the default k = 10 only
a norm above 6x the recent median is a spike, and after `max_consecutive` rejections the next update
is taken whatever its norm, so training cannot stall.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch


class SpikeDetector:
    def __init__(self, window: int, k: float, warmup: int, max_consecutive: int) -> None:
        self.window, self.k, self.warmup, self.max_consecutive = window, k, warmup, max_consecutive
        self.history: deque[float] = deque(maxlen=max(window, 1))
        self.consecutive = 0

    def threshold(self) -> float:
        """Norms above this are spikes; infinite until `warmup` norms have been seen."""
        if self.window == 0 or len(self.history) < self.warmup:
            return math.inf
        values = torch.tensor(list(self.history), dtype=torch.float64)
        median = values.median()
        mad = torch.maximum((values - median).abs().median(), 0.5 * median)
        return float(median + self.k * mad)

    def is_spike(self, norm: float) -> bool:
        """Whether to skip an update of finite gradient norm `norm`; records the decision."""
        spike = norm > self.threshold() and self.consecutive < self.max_consecutive
        self.consecutive = self.consecutive + 1 if spike else 0
        self.history.append(norm)
        return spike

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.clear()
        self.history.extend(state["history"])
        self.consecutive = state["consecutive"]
