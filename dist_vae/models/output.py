"""The one thing every model hands the engine: what to minimise and what to log."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dist_vae.models.regularizers import gaussian_kl_per_unit


@dataclass
class CodeStats:
    """How a batch used the code, for the training-health logs (engine/monitor.py); all detached.

    `mean` [B, D]: the posterior means E_q[z | x], whose spread over images counts active units;
    `kl` [D]: KL(q(z_u | x) || p(z_u)) per unit in nats, batch mean; `variance` [D]: the posterior
    variance per unit, batch mean; `regularizer`: what pushes the code towards the prior, in the
    config's words (the collapse warning names it).
    """

    mean: torch.Tensor
    kl: torch.Tensor
    variance: torch.Tensor
    regularizer: str

    @classmethod
    def of_gaussian(cls, mean: torch.Tensor, logvar: torch.Tensor, regularizer: str) -> CodeStats:
        """The statistics of a diagonal Gaussian posterior N(mean, exp(logvar)) against N(0, I)."""
        mean, logvar = mean.detach().float(), logvar.detach().float()
        kl = gaussian_kl_per_unit(mean, logvar).mean(dim=0)
        return cls(mean, kl, logvar.exp().mean(dim=0), regularizer)


@dataclass
class LossOutput:
    """Result of `model(x, step=...)`.

    `loss` is minimised by the model's main optimiser group. `aux_losses` maps a parameter-group name
    (as returned by the model's `param_groups()`) to a loss that only that group's parameters receive
    gradients from, e.g. the adversarial critic; the engine backpropagates `total()` once. `scalars`
    are detached values for the logs (bits/dim under the key 'bpd'). `code`: the batch's use of the
    latent code (None: the model has no per-unit posterior, and the health logs stay off).
    """

    loss: torch.Tensor
    scalars: dict[str, torch.Tensor] = field(default_factory=dict)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    code: CodeStats | None = None

    def total(self) -> torch.Tensor:
        return self.loss + sum(self.aux_losses.values(), torch.zeros((), device=self.loss.device))
