"""Which updates to skip: non-finite ones, and loss spikes seen as outliers of the gradient norm.

A fixed spike threshold can reject every update once the norm drifts past it (openai/vdvae#25). Here
the threshold follows the run: median + k * MAD of the recent norms. Every finite norm enters the
window, skipped ones too: median and MAD ignore isolated outliers, while a lasting change of level
(the norms of a young run grow several-fold during warm-up) moves them within half a window instead of
being rejected as a string of spikes. The MAD is floored at half the median, so with the default
k = 10 only a norm above 6x the recent median is a spike, and after `max_consecutive` rejections the
next update is taken whatever its norm, so training cannot stall.

Non-finite updates are always skipped, but a run that produces nothing else has diverged: after
`max_nonfinite` in a row the trainer stops (`TrainingDiverged`, exit code 4) instead of skipping
forever. Under fp16 a non-finite gradient of a finite loss is loss-scale overflow: skipped while the
scaler halves its scale, counted apart ('overflow'), and no step towards that stop. Every rank sees
the same norms, so every rank takes the same decisions.
"""

from __future__ import annotations

from collections import deque
from statistics import median_low
from typing import Any


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite updates; the message names the last good checkpoint."""


class SpikeDetector:
    def __init__(self, window: int, k: float, warmup: int, max_consecutive: int) -> None:
        self.window, self.k, self.warmup, self.max_consecutive = window, k, warmup, max_consecutive
        self.history: deque[float] = deque(maxlen=max(window, 1))
        self.consecutive = 0

    def threshold(self) -> float:
        """Norms above this are spikes; infinite until `warmup` norms have been seen."""
        if self.window == 0 or len(self.history) < self.warmup:
            return float("inf")
        median = median_low(self.history)  # the lower middle value, like torch.median
        mad = max(median_low(abs(v - median) for v in self.history), 0.5 * median)
        return median + self.k * mad

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


class UpdateGate:
    """Decides every update, counts the skips, and notices divergence."""

    def __init__(self, spikes: SpikeDetector, max_nonfinite: int) -> None:
        self.spikes = spikes
        self.max_nonfinite = max_nonfinite
        self.skipped = {"nonfinite": 0, "overflow": 0, "spike": 0}
        self.nonfinite_run = 0  # consecutive non-finite updates so far
        self.nonfinite_since = 0  # the step of the first of them

    def decide(self, step: int, norm: float, nonfinite: bool, diverging: bool = True) -> str:
        """'' to apply the update that makes `step`, else why not ('nonfinite', 'overflow', 'spike').

        `diverging=False` marks a non-finite update that is no sign of divergence (fp16 loss-scale
        overflow with a finite loss): an 'overflow', which leaves the run of non-finite updates as it was.
        """
        if nonfinite and not diverging:
            self.skipped["overflow"] += 1
            return "overflow"
        if nonfinite:
            self.skipped["nonfinite"] += 1
            if self.nonfinite_run == 0:
                self.nonfinite_run, self.nonfinite_since = 1, step
            else:
                self.nonfinite_run += 1
            return "nonfinite"
        self.nonfinite_run = 0
        if self.spikes.is_spike(norm):
            self.skipped["spike"] += 1
            return "spike"
        return ""

    @property
    def diverged(self) -> bool:
        return self.nonfinite_run >= self.max_nonfinite

    def divergence(self, last_checkpoint: str) -> TrainingDiverged:
        return TrainingDiverged(
            f"training diverged: {self.nonfinite_run} consecutive non-finite updates since step "
            f"{self.nonfinite_since}; last good checkpoint: {last_checkpoint}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "spikes": self.spikes.state_dict(),
            "skipped": dict(self.skipped),
            "nonfinite_run": [self.nonfinite_run, self.nonfinite_since],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spikes.load_state_dict(state["spikes"])
        self.skipped = {key: int(state["skipped"].get(key, 0)) for key in self.skipped}  # older: no overflow
        self.nonfinite_run, self.nonfinite_since = state["nonfinite_run"]
