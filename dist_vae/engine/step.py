"""One optimizer update: accumulate train.accumulate micro-batches, then apply or skip it.

The step counter counts update attempts: skipped updates still consume their batches, so data
position, LR schedule and step agree after a resume. Whether an update is applied is decided here
for every backend alike (`UpdateGate`). A step reads the device once: the gradient norm, the skip
votes and the preemption flag, all-reduced together (as torch's GradScaler reads its inf check every
step). The learning rate and every random stream are functions of (seed, step, rank), so a resumed
run, on the same or on another number of processes, draws what an uninterrupted one draws.

Which updates are skipped: non-finite ones, and loss spikes seen as outliers of the gradient norm. A
fixed spike threshold can reject every update once the norm drifts past it (openai/vdvae#25); here
it follows the run: median + k * MAD of the recent norms. Every finite norm enters the window,
skipped ones too, so a lasting change of level moves the threshold within half a window. The MAD is
floored at half the median (with k = 10 only a norm above 6x the recent median is a spike), and after
`max_consecutive` rejections the next update is taken whatever its norm, so training cannot stall.
After `max_nonfinite` non-finite updates in a row the run has diverged (`TrainingDiverged`, exit code
4). Under fp16 a non-finite gradient of a finite loss is loss-scale overflow: skipped while the scaler
halves its scale, counted apart ('overflow'), and no step towards that stop.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from statistics import median_low
from typing import Any

import numpy as np
import torch

from dist_vae.config import TrainConfig
from dist_vae.data.order import mix
from dist_vae.distributed import agree
from dist_vae.engine.backend import Backend
from dist_vae.engine.monitor import Window
from dist_vae.engine.stops import GO_ON, INTERRUPT, PREEMPT, PreemptionFlag


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the base LR for the update that takes the run from `step` to `step + 1`: linear
    warm-up over `warmup` updates, then `constant`, `cosine` or `linear` (both to 0 at `total`)."""
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


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 64-bit seed that differs for every (seed, step, rank) triple (the data order's own hash)."""
    return mix(seed, step, rank)


def seed_everything_for_step(seed: int, step: int, rank: int) -> None:
    """Seed python, numpy and torch (every CUDA device too) for training step `step` on `rank`."""
    derived = step_seed(seed, step, rank)
    random.seed(derived)
    np.random.seed(derived % 2**32)  # numpy's legacy global generator takes 32 bits
    torch.manual_seed(derived)  # also seeds every CUDA device


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Side work inside a step (fetching a batch, whose DataLoader may seed its workers from the global
    stream) runs inside this so it takes no draws from the step's stream."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


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
    """Decides every update, counts the skips, and notices divergence (every rank sees the same norms,
    so every rank takes the same decisions)."""

    def __init__(self, spikes: SpikeDetector, max_nonfinite: int) -> None:
        self.spikes = spikes
        self.max_nonfinite = max_nonfinite
        self.skipped = {"nonfinite": 0, "overflow": 0, "spike": 0}
        self.nonfinite_run = 0  # consecutive non-finite updates so far
        self.nonfinite_since = 0  # the step of the first of them

    def decide(self, step: int, norm: float, nonfinite: bool, diverging: bool = True) -> str:
        """'' to apply the update that makes `step`, else why not ('nonfinite', 'overflow', 'spike').
        `diverging=False`: a non-finite update that is no sign of divergence (fp16 overflow)."""
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


def make_gate(train: TrainConfig) -> UpdateGate:
    spikes = SpikeDetector(train.spike_window, train.spike_k, train.spike_warmup, train.max_consecutive_skips)
    return UpdateGate(spikes, train.max_nonfinite_skips)


@dataclass
class Update:
    """Outcome of one optimizer step attempt."""

    grad_norm: float  # the real value: NaN or inf for a non-finite update
    applied: bool
    reason: str = ""  # 'nonfinite', 'overflow' (fp16 loss scale) or 'spike' when not applied
    stop: int = GO_ON  # the highest of every rank's vote (stops.py): GO_ON, INTERRUPT, PREEMPT, LEASE_LOST

    @property
    def preempted(self) -> bool:
        """Some rank was signalled: checkpoint, then stop."""
        return self.stop in (INTERRUPT, PREEMPT)


class UpdateStep:
    """Called once per step: `update = update_step(step, batches, window)` makes update `step + 1`."""

    def __init__(
        self, train: TrainConfig, seed: int, backend: Backend, gate: UpdateGate, preemption: PreemptionFlag
    ) -> None:
        self.train, self.seed, self.backend, self.gate, self.preemption = (
            train,
            seed,
            backend,
            gate,
            preemption,
        )

    def stop_vote(self) -> int:
        """The highest of every rank's stop vote (collective; every rank gets the same answer)."""
        vote = torch.tensor(float(self.preemption.vote()), device=self.backend.accelerator.device)
        return int(agree(self.backend.accelerator, [vote])[0])

    def __call__(self, step: int, batches: Iterator[torch.Tensor], window: Window) -> Update:
        b, t = self.backend, self.train
        seed_everything_for_step(self.seed, step, b.accelerator.process_index)
        b.set_lr(lr_factor(step, t.warmup, t.steps, t.schedule))
        loss = torch.zeros((), device=b.accelerator.device)
        for i in range(t.accumulate):
            started = time.perf_counter()
            with preserved_rng():
                x = next(batches)
            window.data_wait += time.perf_counter() - started
            with b.update_path.accumulating(sync=i == t.accumulate - 1):
                with b.autocast():
                    out = b.model(x, step=step)
                    total = out.total()
                b.update_path.backward(total)
            loss = loss + total.detach()
            window.add_output(out)
        update = self._decide(step, loss)
        window.steps += 1
        window.grad_norm += update.grad_norm
        return update

    def _decide(self, step: int, loss: torch.Tensor) -> Update:
        """Decide on the accumulated gradients (identically on every rank) and apply or discard them."""
        b = self.backend
        norm = b.update_path.grad_norm()
        finite = torch.isfinite(norm)
        requested = torch.tensor(float(self.preemption.vote()), device=norm.device)
        nonfinite, agreed_norm, bad_loss, preempted, value = agree(
            b.accelerator, [~finite, torch.where(finite, norm, 0.0), ~torch.isfinite(loss), requested, norm]
        )
        # Under fp16 a non-finite gradient with a finite loss is loss-scale overflow, not divergence.
        diverging = bool(bad_loss) or self.train.precision != "fp16"
        reason = self.gate.decide(step + 1, agreed_norm, bool(nonfinite), diverging)
        if reason:
            b.update_path.discard(reason in ("nonfinite", "overflow"))
        else:
            b.update_path.apply()
            if b.ema is not None:
                b.ema.update()
        return Update(value, not reason, reason, int(preempted))
