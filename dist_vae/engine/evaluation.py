"""The periodic looks at the model during training: validation bits/dim, sample quality (FID, KID,
precision, recall) and a grid of samples, all from the EMA weights when kept, with randomness derived
from (seed, step)."""

from __future__ import annotations

import torch

from dist_vae.config import Config
from dist_vae.engine.backend import Backend
from dist_vae.engine.logging import RunLogger
from dist_vae.engine.streams import Streams
from dist_vae.metrics.during_training import fid_during_training
from dist_vae.models import evaluating
from dist_vae.sampling import grid_samples


class Evaluation:
    def __init__(self, cfg: Config, backend: Backend, streams: Streams, logger: RunLogger) -> None:
        self.cfg, self.backend, self.streams, self.logger = cfg, backend, streams, logger

    @torch.no_grad()
    def val_bpd(self, step: int) -> float:
        """Mean bits/dim over (at most train.eval_batches batches per rank of) the val split."""
        acc, cfg = self.backend.accelerator, self.cfg
        totals = torch.zeros(2, dtype=torch.float64, device=acc.device)
        stream = self.streams.val()
        with evaluating(self.backend.eval_model) as net, self.backend.autocast():
            torch.manual_seed(cfg.seed + step)
            for i, x in enumerate(stream):
                if i == cfg.train.eval_batches:
                    break
                out = net(x, step=step)
                totals[0] += out.scalars["bpd"].double() * x.shape[0]
                totals[1] += x.shape[0]
        totals = acc.reduce(totals, "sum")
        return float(totals[0] / totals[1])

    def log_val_bpd(self, step: int) -> None:
        """val/bpd (collective: every rank evaluates its share), also as one line on rank 0."""
        bpd = self.val_bpd(step)
        self.logger.scalars({"val/bpd": bpd}, step)
        self.logger.line(f"step {step}: validation bits/dim {bpd:.4f}")

    def log_sample_quality(self, step: int) -> None:
        """eval/fid, eval/kid, eval/precision, eval/recall (collective: every rank embeds its share)."""
        acc = self.backend.accelerator
        quality = fid_during_training(self.backend.eval_model, self.cfg, step, acc.device)
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
