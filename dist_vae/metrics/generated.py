"""The ways a model makes the images FID judges, as chunk generators for `embed.embed_generated`.

Each draws its randomness from (seed, chunk) alone, so a chunk is the same images on whichever rank
and world size makes it. All go through the `GenerativeModel` protocol (sampling.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dist_vae.data.order import mix
from dist_vae.models.protocol import GenerativeModel
from dist_vae.sampling import markov_chain, prior_samples

Generate = Callable[[range], list[torch.Tensor]]


def chunk_generator(device: torch.device, seed: int, chunk: range) -> torch.Generator:
    return torch.Generator(device).manual_seed(mix(seed, "fid", chunk.start) % 2**63)


def _device(model: GenerativeModel) -> torch.device:
    return next(model.parameters()).device  # type: ignore[attr-defined]


def prior_way(model: GenerativeModel, seed: int, autocast: torch.dtype | None = None) -> Generate:
    """Ancestral samples z ~ p(z), x ~ p(x | z): one batch per generation step, the last the sample."""
    device = _device(model)

    def generate(chunk: range) -> list[torch.Tensor]:
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            steps = prior_samples(model, len(chunk), chunk_generator(device, seed, chunk))
        return [images.float() for images in steps]

    return generate


def chain_way(
    model: GenerativeModel, seed: int, steps: int, start: Callable[[range, torch.Generator], torch.Tensor]
) -> Generate:
    """x_K of the Markov chain x -> z ~ q(z | x) -> x ~ p(x | z) from `start(chunk, generator)`."""
    device = _device(model)

    def generate(chunk: range) -> list[torch.Tensor]:
        generator = chunk_generator(device, seed, chunk)
        return [markov_chain(model, start(chunk, generator).to(device), steps, generator)[-1]]

    return generate


def noise(shape: tuple[int, ...]) -> Callable[[range, torch.Generator], torch.Tensor]:
    """Chain starts drawn uniformly from [-1, 1], per chunk."""

    def start(chunk: range, generator: torch.Generator) -> torch.Tensor:
        size = (len(chunk), *shape)
        return torch.rand(size, generator=generator, device=generator.device) * 2 - 1

    return start
