"""Adaptive loss-spike detection on gradient norms.

A fixed threshold can reject every update once the norm drifts past it (openai/vdvae#25). Here the
threshold follows the run: median + k * MAD of the recent accepted norms (the MAD floored at a tenth
of the median, so that a stretch of near-identical norms does not turn every small rise into a
spike), and after
`max_consecutive` rejections the next update is accepted whatever its norm, so training cannot stall.
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
        """Norms above this are spikes; infinite until `warmup` norms have been accepted."""
        if self.window == 0 or len(self.history) < self.warmup:
            return math.inf
        values = torch.tensor(list(self.history), dtype=torch.float64)
        median = values.median()
        mad = torch.maximum((values - median).abs().median(), 0.1 * median)
        return float(median + self.k * mad)

    def is_spike(self, norm: float) -> bool:
        """Whether to skip an update of finite gradient norm `norm`; records the decision."""
        if norm > self.threshold() and self.consecutive < self.max_consecutive:
            self.consecutive += 1
            return True
        self.consecutive = 0
        self.history.append(norm)
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.clear()
        self.history.extend(state["history"])
        self.consecutive = state["consecutive"]
