"""One optimizer update: accumulate train.accumulate micro-batches, then apply or skip it.

The step counter counts update attempts: skipped updates still consume their batches, so data
position, LR schedule and step agree after a resume. Whether an update is applied is decided here
for every backend alike (engine/skip.py). A step reads the device once: the gradient norm, the skip
votes and the preemption flag, all-reduced together (as torch's GradScaler reads its inf check every
step).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dist_vae.config import Config
from dist_vae.engine.backend import Backend, agree
from dist_vae.engine.preemption import PreemptionFlag
from dist_vae.engine.rng import preserved_rng, seed_everything_for_step
from dist_vae.engine.schedule import lr_factor
from dist_vae.engine.skip import SpikeDetector, UpdateGate
from dist_vae.engine.window import Window


@dataclass
class Update:
    """Outcome of one optimizer step attempt."""

    grad_norm: float  # the real value: NaN or inf for a non-finite update
    applied: bool
    reason: str = ""  # 'nonfinite', 'overflow' (fp16 loss scale) or 'spike' when not applied
    preempted: bool = False  # some rank had been signalled (every rank agrees)


def make_gate(cfg: Config) -> UpdateGate:
    t = cfg.train
    spikes = SpikeDetector(t.spike_window, t.spike_k, t.spike_warmup, t.max_consecutive_skips)
    return UpdateGate(spikes, t.max_nonfinite_skips)


class UpdateStep:
    """Called once per step: `update = update_step(step, batches, window)` makes update `step + 1`."""

    def __init__(self, cfg: Config, backend: Backend, gate: UpdateGate, preemption: PreemptionFlag) -> None:
        self.cfg, self.backend, self.gate, self.preemption = cfg, backend, gate, preemption

    def preempted(self) -> bool:
        """Whether any rank has been signalled (collective; every rank gets the same answer)."""
        requested = torch.tensor(float(self.preemption.requested), device=self.backend.accelerator.device)
        return bool(agree(self.backend.accelerator, [requested])[0])

    def __call__(self, step: int, batches: Iterator[torch.Tensor], window: Window) -> Update:
        b, t = self.backend, self.cfg.train
        seed_everything_for_step(self.cfg.seed, step, b.accelerator.process_index)
        b.set_lr(lr_factor(step, t.warmup, t.steps, t.schedule))
        loss = torch.zeros((), device=b.accelerator.device)
        for i in range(t.accumulate):
            x = self._fetch(batches, window)
            with b.update_path.accumulating(sync=i == t.accumulate - 1):
                with b.autocast():
                    out = b.model(x, step=step)
                    total = out.total()
                b.update_path.backward(total)
            loss = loss + total.detach()
            window.add("loss", out.loss)
            for name, value in out.scalars.items():
                window.add(name, value)
            for name, value in out.aux_losses.items():
                window.add(f"aux/{name}", value)
            if out.code is not None:
                window.codes.append(out.code)
            window.micro_batches += 1
        update = self._decide(step, loss)
        window.steps += 1
        window.grad_norm += update.grad_norm
        return update

    def _fetch(self, batches: Iterator[torch.Tensor], window: Window) -> torch.Tensor:
        started = time.perf_counter()
        with preserved_rng():
            x = next(batches)
        window.data_wait += time.perf_counter() - started
        return x

    def _decide(self, step: int, loss: torch.Tensor) -> Update:
        """Decide on the accumulated gradients (identically on every rank) and apply or discard them."""
        b = self.backend
        norm = b.update_path.grad_norm()
        finite = torch.isfinite(norm)
        requested = torch.tensor(float(self.preemption.requested), device=norm.device)
        nonfinite, agreed_norm, bad_loss, preempted, value = agree(
            b.accelerator, [~finite, torch.where(finite, norm, 0.0), ~torch.isfinite(loss), requested, norm]
        )
        # Under fp16 a non-finite gradient with a finite loss is loss-scale overflow, not divergence.
        diverging = bool(bad_loss) or self.cfg.train.precision != "fp16"
        reason = self.gate.decide(step + 1, agreed_norm, bool(nonfinite), diverging)
        if reason:
            b.update_path.discard(reason in ("nonfinite", "overflow"))
        else:
            b.update_path.apply()
            if b.ema is not None:
                b.ema.update()
        return Update(value, not reason, reason, bool(preempted))
