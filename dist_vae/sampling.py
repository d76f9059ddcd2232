"""Samplers: cached PixelCNN++ generation, PixelVAE Markov chains and prior samples, iterative canvases.

Naive PixelCNN++ generation (`PixelVAE.decode`) runs the whole network once per pixel; the cached
sampler (`models/pixelcnnpp_cache.py`) computes each position of each layer once.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_vae.models import pixelcnnpp_cache
from dist_vae.models.iterative_vae import IterativeVAE
from dist_vae.models.pixel_vae import PixelVAE

__all__ = [
    "ancestral_samples",
    "cached_decode",
    "grid_samples",
    "iterative_canvases",
    "markov_chain",
]


@torch.no_grad()
def cached_decode(model: PixelVAE, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x ~ p(x | z) [n, 3, R, R] in [-1, 1], drawing exactly as `model.decode` does, pixel by pixel.

    The model is put in eval mode for the duration (dropout off), as naive decoding does.
    """
    was_training = model.training
    model.eval()
    try:
        return pixelcnnpp_cache.cached_decode(model.decoder, z, model.resolution, generator)
    finally:
        model.train(was_training)


def _prior(model: PixelVAE, n: int, generator: torch.Generator | None) -> torch.Tensor:
    param = next(model.parameters())
    noise_device = generator.device if generator is not None else param.device
    return torch.randn(n, model.latent_dim, generator=generator, device=noise_device).to(param)


@torch.no_grad()
def ancestral_samples(
    model: PixelVAE, n: int, generator: torch.Generator | None = None, cached: bool = True
) -> torch.Tensor:
    """z ~ p(z) = N(0, I), then x ~ p(x | z): [n, 3, R, R] in [-1, 1]."""
    z = _prior(model, n, generator)
    return cached_decode(model, z, generator) if cached else model.decode(z, generator)


@torch.no_grad()
def markov_chain(
    model: PixelVAE,
    start: torch.Tensor,
    steps: int,
    generator: torch.Generator | None = None,
    cached: bool = True,
) -> list[torch.Tensor]:
    """x_0 = start, then K times z ~ q(z | x_k), x_{k+1} ~ p(x | z); returns [x_0, ..., x_K].

    `start` is data or noise in [-1, 1] (the range the model was trained on; the seed's chain started
    from U(0, 1), off that range). The encoder runs in eval mode, like the decoder.
    """
    if start.dim() != 4 or start.shape[1:] != (3, model.resolution, model.resolution):
        raise ValueError(
            f"chain start must be [n, 3, {model.resolution}, {model.resolution}], got {tuple(start.shape)}"
        )
    if start.min() < -1.0 or start.max() > 1.0:
        raise ValueError(f"chain start must lie in [-1, 1], got [{start.min():.3f}, {start.max():.3f}]")
    was_training = model.training
    model.eval()
    try:
        chain = [start.to(next(model.parameters()))]
        for _ in range(steps):
            mean, logvar = model.encode(chain[-1])
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = (mean + torch.exp(0.5 * logvar) * noise).to(chain[0])
            chain.append(cached_decode(model, z, generator) if cached else model.decode(z, generator))
        return chain
    finally:
        model.train(was_training)


@torch.no_grad()
def iterative_canvases(
    model: IterativeVAE, n: int, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """The iterative VAE's T canvases from the prior, each [n, 3, R, R], in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return model.sample(n, generator)
    finally:
        model.train(was_training)


@torch.no_grad()
def grid_samples(
    model: nn.Module, n: int, generator: torch.Generator | None = None
) -> torch.Tensor | list[torch.Tensor]:
    """What a run's sample grid shows: cached ancestral samples of a PixelVAE (naive generation would
    cost one full forward pass per pixel), the per-step canvases of the iterative VAE."""
    if isinstance(model, PixelVAE):
        was_training = model.training
        model.eval()
        try:
            return ancestral_samples(model, n, generator)
        finally:
            model.train(was_training)
    if isinstance(model, IterativeVAE):
        return iterative_canvases(model, n, generator)
    raise TypeError(f"no sampler for {type(model).__name__}")
