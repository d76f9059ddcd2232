"""When things happen between steps (log points, the periodic actions, checkpoints) and the periodic
looks at the model: validation bits/dim, sample quality (FID, KID, precision, recall) and a grid of
samples, all from the EMA weights when kept, with randomness derived from (seed, step). A new
periodic action is one more `Periodic` in `periodic_actions`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dist_vae.config import Config, TrainConfig
from dist_vae.data.storage import StoreUnreachable
from dist_vae.engine.backend import Backend
from dist_vae.engine.feeds import PeerUnreachable, Streams
from dist_vae.engine.monitor import RunLogger
from dist_vae.metrics.during_training import fid_during_training
from dist_vae.models import evaluating
from dist_vae.sampling import grid_samples


@dataclass(frozen=True)
class Periodic:
    """`action(step)` after every `every`-th step; collective actions run on every rank."""

    every: int
    action: Callable[[int], None]


class Cadence:
    def __init__(self, train: TrainConfig, actions: list[Periodic]) -> None:
        self.train, self.actions = train, actions

    def log_due(self, step: int, diverged: bool) -> bool:
        """Every train.log_every steps, at the last step, and before a divergence stops the run."""
        return diverged or step % self.train.log_every == 0 or step == self.train.steps

    def reads_due(self, step: int) -> bool:
        """Whether the host may wait for the device after `step`: a log point, an evaluation or sample,
        or a checkpoint. Only there are the skip counts, divergence and (several processes) the
        preemption flag read; every other step runs without a host synchronisation."""
        actions = any(step % periodic.every == 0 for periodic in self.actions)
        return actions or self.log_due(step, False) or self.save_due(step, False)

    def run_actions(self, step: int) -> None:
        for periodic in self.actions:
            if step % periodic.every == 0:
                periodic.action(step)

    def save_due(self, step: int, preempted: bool) -> bool:
        """Every train.checkpoint_every steps, at the last step, and before a preempted run stops."""
        return preempted or step % self.train.checkpoint_every == 0 or step == self.train.steps


class Evaluation:
    def __init__(self, cfg: Config, backend: Backend, streams: Streams, logger: RunLogger) -> None:
        self.cfg, self.backend, self.streams, self.logger = cfg, backend, streams, logger

    @torch.no_grad()
    def val_bpd(self, step: int) -> float:
        """Mean bits/dim over (at most train.eval_batches batches per rank of) the val split. An object
        store unreachable on any rank is raised on every rank, agreed in the final sum (feeds.py)."""
        acc, cfg = self.backend.accelerator, self.cfg
        totals = torch.zeros(3, dtype=torch.float64, device=acc.device)  # bits, images, unreachable
        unreachable: StoreUnreachable | None = None
        # The trained weights under train.cuda_graphs run eagerly here: in inference each call of a
        # captured forward starts a new generation of CUDA graph trees, which frees the outputs of the
        # call before, and the iterative VAE's unroll keeps every step's (one captured call per step).
        captured = cfg.train.cuda_graphs and self.backend.ema is None
        eager = torch.compiler.set_stance("force_eager") if captured else contextlib.nullcontext()
        with evaluating(self.backend.eval_model) as net, self.backend.autocast(), eager:
            torch.manual_seed(cfg.seed + step)
            try:
                for i, x in enumerate(self.streams.val):
                    if i == cfg.train.eval_batches:
                        break
                    out = net(x, step=step)
                    totals[0] += out.scalars["bpd"].double() * x.shape[0]
                    totals[1] += x.shape[0]
            except StoreUnreachable as exc:
                unreachable, totals[2] = exc, 1
        totals = acc.reduce(totals, "sum")
        if totals[2]:
            raise unreachable or PeerUnreachable()
        return float(totals[0] / totals[1])

    def log_val_bpd(self, step: int) -> None:
        """val/bpd (collective: every rank evaluates its share), also as one line on rank 0."""
        bpd = self.val_bpd(step)
        self.logger.scalars({"val/bpd": bpd}, step)
        self.logger.line(f"step {step}: validation bits/dim {bpd:.4f}")

    def log_sample_quality(self, step: int) -> None:
        """eval/fid, eval/kid, eval/precision, eval/recall (collective: every rank embeds its share)."""
        cfg, device = self.cfg, self.backend.accelerator.device
        quality = fid_during_training(
            self.backend.eval_model,
            cfg.eval,
            cfg.data,
            step,
            device,
            seed=cfg.seed,
            precision=cfg.train.precision,
        )
        if quality:
            self.logger.scalars(quality, step)

    @torch.no_grad()
    def log_samples(self, step: int) -> None:
        """A sample grid (rank 0 alone): samples/step-N.png and the 'samples' image."""
        acc = self.backend.accelerator
        if not acc.is_main_process:
            return
        generator = torch.Generator(acc.device).manual_seed(self.cfg.seed + step)
        with evaluating(self.backend.eval_model) as net, self.backend.autocast():
            rows = grid_samples(net, self.cfg.train.sample_count, generator=generator)
        self.logger.samples(rows, step)


def periodic_actions(cfg: Config, evaluation: Evaluation, validate: bool) -> list[Periodic]:
    """In the order they run at a step where several are due."""
    t = cfg.train
    actions = [Periodic(t.eval_every, evaluation.log_val_bpd)] if validate else []
    if cfg.eval.fid_every:
        actions.append(Periodic(cfg.eval.fid_every, evaluation.log_sample_quality))
    return [*actions, Periodic(t.sample_every, evaluation.log_samples)]
