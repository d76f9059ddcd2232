"""One optimizer update: accumulate train.accumulate micro-batches, then apply or skip it.

The step counter counts update attempts: skipped updates still consume their batches, so data
position, LR schedule and step agree after a resume. Whether an update is applied is decided here
for every backend alike (`UpdateGate`), on the device: the gradient norm and the skip votes are
all-reduced together and never read by the host inside a step, the update is applied masked, and
the counts are read at log, evaluation and checkpoint steps (docs/training.md). The learning rate
and every random stream are functions of (seed, step, rank), so a resumed run, on the same or on
another number of processes, draws what an uninterrupted one draws.

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dist_vae.config import TrainConfig
from dist_vae.data.order import mix
from dist_vae.distributed import agree, agree_on_device
from dist_vae.engine.backend import Backend
from dist_vae.engine.monitor import Window
from dist_vae.engine.stops import GO_ON, PreemptionFlag


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
    py_state, np_state = random.getstate(), np.random.get_state()
    # This process's GPU only: the step draws on no other, and every visible GPU's would be read twice
    # per micro-batch on a node whose ranks each see all of them.
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite updates; the message names the last good checkpoint."""


class SpikeDetector:
    """median + k * MAD of the recent finite norms, kept and decided on the device (a ring buffer)."""

    def __init__(
        self, window: int, k: float, warmup: int, max_consecutive: int, device: torch.device | str = "cpu"
    ) -> None:
        self.window, self.k, self.warmup, self.max_consecutive = window, k, warmup, max_consecutive
        self.size = max(window, 1)
        self.history = torch.zeros(self.size, device=device)
        self.seen = torch.zeros((), dtype=torch.long, device=device)  # norms ever recorded
        self.consecutive = torch.zeros((), dtype=torch.long, device=device)

    def threshold_on_device(self) -> torch.Tensor:
        h = self.history
        if self.window == 0:
            return torch.full((), math.inf, device=h.device)
        n = self.seen.clamp(max=self.size)
        valid = torch.arange(self.size, device=h.device) < n
        middle = ((n - 1).clamp(min=0) // 2).reshape(1)  # the lower middle value, like torch.median
        median = torch.where(valid, h, math.inf).sort().values.gather(0, middle)[0]
        mad = torch.where(valid, (h - median).abs(), math.inf).sort().values.gather(0, middle)[0]
        limit = median + self.k * torch.maximum(mad, 0.5 * median)
        return torch.where((n >= self.warmup) & (n > 0), limit, math.inf)

    def threshold(self) -> float:
        """Norms above this are spikes; infinite until `warmup` norms have been seen (reads the device)."""
        return float(self.threshold_on_device())

    def observe(self, norm: torch.Tensor, record: torch.Tensor) -> torch.Tensor:
        """Whether the norm is a spike (a device flag); only where `record` is it counted and kept."""
        spike = record & (norm > self.threshold_on_device()) & (self.consecutive < self.max_consecutive)
        counted = torch.where(spike, self.consecutive + 1, 0)
        self.consecutive.copy_(torch.where(record, counted, self.consecutive))
        slot = (self.seen % self.size).reshape(1)
        self.history.index_copy_(0, slot, torch.where(record, norm.float(), self.history.gather(0, slot)))
        self.seen.add_(record.long())
        return spike

    def is_spike(self, norm: float) -> bool:
        """Whether to skip an update of finite gradient norm `norm`; records the decision."""
        return bool(self.observe(torch.tensor(norm, device=self.history.device), torch.tensor(True)))

    def state_dict(self) -> dict[str, Any]:
        seen, values = int(self.seen), self.history.tolist()
        start = seen % self.size
        ordered = values[:seen] if seen <= self.size else values[start:] + values[:start]
        kept = ordered[-self.window :] if self.window else []
        return {"history": kept, "consecutive": int(self.consecutive)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        values = list(state["history"])[-self.size :]
        self.history.zero_()
        self.history[: len(values)] = torch.tensor(values, dtype=torch.float32)
        self.seen.fill_(len(values))
        self.consecutive.fill_(int(state["consecutive"]))


REASONS = ("", "nonfinite", "overflow", "spike", "diverged")  # the codes the device decision returns


class UpdateGate:
    """Decides every update on the device, counts the skips there, and latches divergence; the host
    reads it at log, evaluation and checkpoint steps only (every rank sees the same norms, so every
    rank takes the same decisions). Once diverged, every later update is skipped and nothing more is
    counted, so a divergence read some steps late reports what it was when it happened."""

    def __init__(self, spikes: SpikeDetector, max_nonfinite: int) -> None:
        self.spikes, self.max_nonfinite = spikes, max_nonfinite
        device = spikes.history.device
        self.counts = torch.zeros(3, dtype=torch.long, device=device)  # nonfinite, overflow, spike
        self.run = torch.zeros((), dtype=torch.long, device=device)  # consecutive non-finite updates
        self.since = torch.zeros((), dtype=torch.long, device=device)  # the step of the first of them
        self.stopped = torch.zeros((), dtype=torch.bool, device=device)

    def decide_on_device(
        self, step: int, norm: torch.Tensor, nonfinite: torch.Tensor, diverging: torch.Tensor
    ) -> torch.Tensor:
        """The index in REASONS (0: apply) of the update that makes `step`, without reading the device.
        `diverging=False`: a non-finite update that is no sign of divergence (fp16 overflow)."""
        live = ~self.stopped
        bad, overflow, finite = live & nonfinite & diverging, live & nonfinite & ~diverging, live & ~nonfinite
        spike = self.spikes.observe(norm, finite)
        self.since.copy_(torch.where(bad & (self.run == 0), step, self.since))
        self.run.copy_(torch.where(bad, self.run + 1, torch.where(finite, 0, self.run)))
        self.counts.add_(torch.stack([bad, overflow, spike]).long())
        reason = torch.where(bad, 1, torch.where(overflow, 2, torch.where(spike, 3, 0)))
        reason = torch.where(live, reason, 4)
        self.stopped.logical_or_(self.run >= self.max_nonfinite)
        return reason

    def decide(self, step: int, norm: float, nonfinite: bool, diverging: bool = True) -> str:
        """The same decision read on the host: '' to apply, else why not."""
        device = self.run.device
        flags = [torch.tensor(v, device=device) for v in (nonfinite, diverging)]
        return REASONS[int(self.decide_on_device(step, torch.tensor(norm, device=device), *flags))]

    @property
    def skipped(self) -> dict[str, int]:
        return dict(zip(REASONS[1:4], self.counts.tolist(), strict=True))

    @property
    def diverged(self) -> bool:
        return bool(self.stopped)

    def divergence(self, last_checkpoint: str) -> TrainingDiverged:
        return TrainingDiverged(
            f"training diverged: {int(self.run)} consecutive non-finite updates since step "
            f"{int(self.since)}; last good checkpoint: {last_checkpoint}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "spikes": self.spikes.state_dict(),
            "skipped": self.skipped,
            "nonfinite_run": [int(self.run), int(self.since)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spikes.load_state_dict(state["spikes"])
        skipped = state["skipped"]  # older checkpoints: no overflow
        self.counts.copy_(torch.tensor([int(skipped.get(key, 0)) for key in REASONS[1:4]]))
        run, since = state["nonfinite_run"]
        self.run.fill_(run)
        self.since.fill_(since)
        self.stopped.fill_(run >= self.max_nonfinite)


def make_gate(train: TrainConfig, device: torch.device | str = "cpu") -> UpdateGate:
    t = train
    spikes = SpikeDetector(t.spike_window, t.spike_k, t.spike_warmup, t.max_consecutive_skips, device)
    return UpdateGate(spikes, t.max_nonfinite_skips)


@dataclass
class Update:
    """Outcome of one optimizer step attempt, on the device (read at log points only)."""

    grad_norm: torch.Tensor  # the real value: NaN or inf for a non-finite update
    reason: torch.Tensor  # index in REASONS: 0 applied, else 'nonfinite', 'overflow' (fp16), 'spike'


class UpdateStep:
    """Called once per step: `update = update_step(step, batches, window)` makes update `step + 1`.

    No step reads the device: the norm, the skip votes and the decision stay there, and the update is
    applied masked (update.py). The host reads only at the steps the trainer names (log, evaluation,
    checkpoint): the gate's counts and `preempted`.
    """

    def __init__(
        self, train: TrainConfig, seed: int, backend: Backend, gate: UpdateGate, preemption: PreemptionFlag
    ) -> None:
        self.train, self.seed, self.backend, self.gate = train, seed, backend, gate
        self.preemption = preemption

    def stop_vote(self, reads: bool = True) -> int:
        """The highest of every rank's stop vote (stops.py: GO_ON, INTERRUPT, PREEMPT, LEASE_LOST); every
        rank gets the same answer. One process: its own vote, every step, free. Several: a collective,
        so only where `reads` (a log, evaluation or checkpoint step, where the host waits for the
        device anyway); elsewhere GO_ON."""
        acc = self.backend.accelerator
        if acc.num_processes == 1:
            return self.preemption.vote()
        if not reads:
            return GO_ON
        vote = torch.tensor(float(self.preemption.vote()), device=acc.device)
        return int(agree(acc, [vote])[0])

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
        update = self.decide(step, loss)
        window.steps += 1
        window.grad_norm = window.grad_norm + update.grad_norm
        return update

    def decide(self, step: int, loss: torch.Tensor) -> Update:
        """Decide on the accumulated gradients (identically on every rank) and apply them masked."""
        b = self.backend
        norm = b.update_path.grad_norm()
        finite = torch.isfinite(norm)
        votes = [~finite, torch.where(finite, norm, 0.0), ~torch.isfinite(loss)]
        votes = agree_on_device(b.accelerator, votes)
        nonfinite, agreed_norm, bad_loss = votes[0] > 0, votes[1], votes[2] > 0
        # Under fp16 a non-finite gradient with a finite loss is loss-scale overflow, not divergence.
        diverging = bad_loss | (self.train.precision != "fp16")
        reason = self.gate.decide_on_device(step + 1, agreed_norm, nonfinite, diverging)
        skip = reason != 0
        b.update_path.step_masked(skip, nonfinite)
        if b.ema is not None:
            b.ema.update(~skip)
        return Update(norm, reason)
