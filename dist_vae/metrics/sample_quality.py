"""FID, KID and precision/recall/density/coverage for every way a model samples (tools/evaluate.py).

Ways: `prior` (ancestral, the last generation step), with `per_step` also `prior_step_k` for every
step k (the iterative VAE's canvas after k refinements), and with `chain_steps=K` the Markov chain
x -> z ~ q(z | x) -> x ~ p(x | z) after K steps from the reference images themselves
(`chain_data_K`) and from uniform noise (`chain_noise_K`). Each way: N generated images against the
first N images of the split. Collective: every rank calls it and embeds its share; the main process
gets the numbers, the others {}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dist_vae.distributed import world
from dist_vae.metrics.embed import embed_generated, split_chunks
from dist_vae.metrics.fid import sample_quality
from dist_vae.metrics.generated import chain_way, noise, prior_way
from dist_vae.metrics.inception import load_inception
from dist_vae.metrics.reference import reference_features
from dist_vae.metrics.settings import EvalConfig
from dist_vae.models.protocol import GenerativeModel


def _data_starts(
    data_cfg: Any, split: str, n: int, batch: int
) -> Callable[[range, torch.Generator], torch.Tensor]:
    """Chain starts: the chunk's own split images, read in this rank's chunk order."""
    source = split_chunks(data_cfg, split, n, batch)

    def start(chunk: range, generator: torch.Generator) -> torch.Tensor:
        got, images = next(source)
        assert got == chunk, f"chunk {got} read where {chunk} was expected"
        return images

    return start


@torch.no_grad()
def quality_by_way(
    model: GenerativeModel,
    data_cfg: Any,
    split: str,
    cfg: EvalConfig,
    seed: int = 0,
    *,
    per_step: bool = False,
    chain_steps: int = 0,
    progress: Callable[[int], object] = lambda k: None,
) -> dict[str, dict[str, float]]:
    """{way: numbers} for N = cfg.fid_samples; see the module doc."""
    device = next(model.parameters()).device  # type: ignore[attr-defined]
    n, batch = cfg.fid_samples, cfg.batch_size
    extractor = load_inception(cfg.inception, device)
    reference = reference_features(data_cfg, split, n, extractor, batch, progress)
    steps = embed_generated(extractor, n, batch, prior_way(model, seed), progress)
    ways = {"prior": steps[-1]}
    if per_step:
        ways.update({f"prior_step_{k}": features for k, features in enumerate(steps, 1)})
    if chain_steps:
        shape = (3, model.resolution, model.resolution)
        starts = {"data": _data_starts(data_cfg, split, n, batch), "noise": noise(shape)}
        for name, start in starts.items():
            (features,) = embed_generated(
                extractor, n, batch, chain_way(model, seed, chain_steps, start), progress
            )
            ways[f"chain_{name}_{chain_steps}"] = features
    if world()[0] != 0:
        return {}
    return {way: sample_quality(reference.features, features, cfg, seed) for way, features in ways.items()}
