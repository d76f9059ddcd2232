"""Is the latent code in use? The health/* scalars of every log point, and a one-time collapse warning.

A model whose LossOutput carries `code` (models/output.py: CodeStats) gets at every log point:
  health/active_units            units whose posterior mean varies over images, Var_x E_q[z_u | x] > 0.01
                                 (Burda et al.; `metrics.active_units`), over the newest
                                 health.units_buffer images rank 0 trained on
  health/active_units_relative   the same count on the means in units of each unit's posterior std:
                                 Var_x E_q[z_u | x] > 0.01 E_x Var_q[z_u | x]
  health/kl_per_unit_min, health/kl_per_unit_median   per-unit KL in nats, mean over the log window
                                 and the ranks
  health/posterior_variance      the encoder's posterior variance, mean over units, images and ranks
When the code has collapsed (no relatively active unit, or every unit's KL below health.kl_threshold)
for health.collapse_logs log points in a row, rank 0 prints one warning line, once per process.

Why the alarm counts relative to the posterior's spread: Burda's threshold presumes codes at the
prior's scale, which only a KL term enforces. Without it (model.reg=none) the encoder shrinks means and
variances together; in the collapse test's reg=none run (trained to 250 steps) the absolute count
read 0 for ten log points in a row while the code held 12 to 22 nats, every unit's means varying by
2% to 60% of its posterior variance. The ELBO run that did collapse stayed below 0.01 on both counts.
"""

from __future__ import annotations

import torch

from dist_vae.config import HealthConfig
from dist_vae.engine.logging import RunLogger
from dist_vae.metrics import active_units
from dist_vae.models.output import CodeStats


def per_unit(codes: list[CodeStats], device: torch.device) -> torch.Tensor:
    """[2 D]: the window's per-unit KL and posterior variance, micro-batch means, to be averaged over
    the ranks with the other scalars of the log point ([0] when the model reports no code)."""
    if not codes:
        return torch.zeros(0, device=device)
    kl = torch.stack([c.kl for c in codes]).mean(dim=0)
    return torch.cat([kl, torch.stack([c.variance for c in codes]).mean(dim=0)]).to(device)


class CodeHealth:
    """Rank 0's running buffer of posterior means and the collapse alarm's state."""

    def __init__(self, cfg: HealthConfig, logger: RunLogger) -> None:
        self.cfg, self.logger = cfg, logger
        self.means: torch.Tensor | None = None  # [<= units_buffer, D], newest last
        self.collapsed_logs = 0
        self.warned = False

    def values(self, codes: list[CodeStats], units: torch.Tensor, step: int) -> dict[str, float]:
        """The health/* scalars of this log point from the window's `codes` and the ranks' mean
        `per_unit` values; warns when the code has stayed collapsed long enough ({} on other ranks)."""
        if not codes or not self.logger.enabled:
            return {}
        newest = torch.cat([c.mean for c in codes])
        recent = newest if self.means is None else torch.cat([self.means, newest.to(self.means)])
        self.means = recent[-self.cfg.units_buffer :]
        kl, variance = units.float().cpu().chunk(2)
        values = {
            "health/kl_per_unit_min": kl.min().item(),
            "health/kl_per_unit_median": kl.quantile(0.5).item(),
            "health/posterior_variance": variance.mean().item(),
        }
        active = None
        if self.means.shape[0] >= 2:
            values["health/active_units"] = float(active_units(self.means))
            active = active_units(self.means / variance.sqrt().to(self.means))
            values["health/active_units_relative"] = float(active)
        collapsed = active == 0 or kl.max().item() < self.cfg.kl_threshold
        self.collapsed_logs = self.collapsed_logs + 1 if collapsed else 0
        if self.cfg.collapse_logs and self.collapsed_logs >= self.cfg.collapse_logs and not self.warned:
            self.warned = True
            self._warn(step, active, kl, codes[-1].regularizer)
        return values

    def _warn(self, step: int, active: int | None, kl: torch.Tensor, regularizer: str) -> None:
        units = kl.numel()
        counted = f"{active} of {units}" if active is not None else f"? of {units}"
        self.logger.line(
            f"warning: posterior collapse at step {step}: {counted} latent units active (relative to "
            f"their posterior spread), KL/unit median "
            f"{kl.quantile(0.5).item():.3g} nats, max {kl.max().item():.3g} ({regularizer}), "
            f"{self.collapsed_logs} log points in a row; z carries almost nothing about the images "
            "(the decoder models them alone, or the KL weight is too strong): see the README's "
            "failure modes"
        )
