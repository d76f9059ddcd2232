"""Samplers over any `GenerativeModel`: prior samples, sample grids, Markov chains, reconstructions.

Each runs the model in eval mode and restores its mode after. The PixelVAE's decoding is the cached
PixelCNN++ sampler (`models/pixelcnnpp_cache.py`); naive generation would cost one full forward pass
per pixel.
"""

from __future__ import annotations

import math

import torch

from dist_vae.models.protocol import GenerativeModel, evaluating

__all__ = ["grid_samples", "markov_chain", "prior_samples", "reconstructions"]


@torch.no_grad()
def prior_samples(
    model: GenerativeModel, n: int, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """z ~ p(z), then x ~ p(x | z): one [n, 3, R, R] batch per generation step, the last the sample."""
    with evaluating(model):
        return model.decode(model.prior_sample(n, generator), generator)


@torch.no_grad()
def grid_samples(
    model: GenerativeModel, n: int, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """The rows of a run's sample grid: one per generation step (each n images) for a model with
    several, else the n samples tiled near-square (a last short row is dropped, unless it is the only one)."""
    steps = prior_samples(model, n, generator)
    if len(steps) > 1:
        return steps
    per_row = math.ceil(math.sqrt(n))
    rows = list(steps[0].split(per_row))
    if rows[-1].shape[0] != per_row:
        rows = rows[:-1] or [rows[-1]]
    return rows


@torch.no_grad()
def markov_chain(
    model: GenerativeModel, start: torch.Tensor, steps: int, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """x_0 = start, then K times z ~ q(z | x_k), x_{k+1} ~ p(x | z); returns [x_0, ..., x_K].

    `start` is data or noise in [-1, 1] (the range the model was trained on; the seed's chain started
    from U(0, 1), off that range).
    """
    side = model.resolution
    if start.dim() != 4 or start.shape[1:] != (3, side, side):
        raise ValueError(f"chain start must be [n, 3, {side}, {side}], got {tuple(start.shape)}")
    if start.min() < -1.0 or start.max() > 1.0:
        raise ValueError(f"chain start must lie in [-1, 1], got [{start.min():.3f}, {start.max():.3f}]")
    with evaluating(model):
        chain = [start.to(next(model.parameters()))]
        for _ in range(steps):
            z = model.posterior_sample(chain[-1], generator)
            chain.append(model.decode(z, generator)[-1].to(chain[0]))
        return chain


@torch.no_grad()
def reconstructions(
    model: GenerativeModel, x: torch.Tensor, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """x ~ p(x | z) at the posterior mean of each image, per generation step: a decoder that averages
    gives blurred ones, and unlike prior samples they cannot look sharp merely by being noisy."""
    with evaluating(model):
        return model.decode(model.posterior(x).mean, generator)
