"""What every model offers the trainer, the samplers, the metrics and the tools: `GenerativeModel`.

Callers use only these methods, so a new model works with all of them once it implements them and is
registered (`models.register_model`). Codes z are plain tensors [B, latent_dim]: a model whose
latent is structured (the iterative VAE's T steps) concatenates it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from dist_vae.models.output import LossOutput


@dataclass
class Posterior:
    """q(z | x) for a batch: `mean` [B, latent_dim] (the codes whose spread counts active units) and,
    when q(z | x) is one diagonal Gaussian, its `logvar` (then I(x; z) has a closed form over the
    gathered posteriors; None: the metrics sample and score codes instead)."""

    mean: torch.Tensor
    logvar: torch.Tensor | None


@runtime_checkable
class GenerativeModel(Protocol):
    """A latent-variable image model on [B, 3, resolution, resolution] images in [-1, 1].

    `forward(x, step)` returns a LossOutput whose scalars hold 'bpd' (bits/dim the logs and the
    trainer's evaluation report), 'kl' (nats per image) and, when 'bpd' is not -ELBO's, 'elbo_bpd';
    its optional `code` (CodeStats: per-unit KL, posterior means and variances) feeds the health logs.
    Inference methods run in the caller's mode: wrap them in `evaluating(model)`.
    """

    resolution: int
    latent_dim: int

    def forward(self, x: torch.Tensor, step: int = 0) -> LossOutput: ...

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameter group name -> parameters; every parameter exactly once ('main', e.g. 'critic')."""
        ...

    def prior_sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n codes z ~ p(z), [n, latent_dim]."""
        ...

    def decode(self, z: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """x ~ p(x | z): one [n, 3, R, R] image batch per generation step, the last one the sample."""
        ...

    def posterior(self, x: torch.Tensor) -> Posterior: ...

    def posterior_sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One code per image, z ~ q(z | x), [B, latent_dim]."""
        ...

    def posterior_log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log q(z | x_b) [B] for every image x_b and z [1, latent_dim] (or [B, latent_dim], row-wise)."""
        ...

    def log_importance_weight(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """log p(x, z) - log q(z | x) [B] in nats for one z ~ q(z | x): its mean is the ELBO."""
        ...


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode (dropout off) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
