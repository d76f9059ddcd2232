"""Numbers that judge a trained model: likelihood bounds over a split, use of the code, sharpness.

Likelihoods are in nats inside and bits/dim when reported; every density stays a log-density.

The Generalized-PixelVAE code estimates I(x; z) by multiplying Gaussian densities, which underflows
to 0 (and the estimate to nan) once z has a few tens of dimensions; here every density stays a
log-density and the aggregate posterior is a logsumexp.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dist_vae.models import logistic_mixture
from dist_vae.models.protocol import GenerativeModel, evaluating

__all__ = [
    "EvalPart",
    "accumulate",
    "active_units",
    "evaluate",
    "importance_weighted_log_likelihood",
    "laplacian_variance",
    "model_mutual_information",
    "mutual_information",
    "sample_spread",
    "sample_spread_per_step",
    "summarize",
]


def _pairwise_log_density(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z_i; mean_j, diag exp(logvar_j)) for every pair, [len(z), len(mean)]."""
    inv_var = torch.exp(-logvar)
    mahalanobis = z.square() @ inv_var.T - 2.0 * z @ (mean * inv_var).T + (mean.square() * inv_var).sum(dim=1)
    return -0.5 * (mahalanobis + logvar.sum(dim=1) + z.shape[1] * math.log(2.0 * math.pi))


def _mi_terms(log_q: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Summed log q(z_i | x_i) - log q(z_i) for rows i: log_q[i, j] = log q(z_i | x_j) over all N
    encoders j, so the aggregate posterior q(z_i) = mean_j q(z_i | x_j) is a logsumexp."""
    return (own - (torch.logsumexp(log_q, dim=1) - math.log(log_q.shape[1]))).sum()


def mutual_information(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    samples: int = 1,
    generator: torch.Generator | None = None,
    chunk: int = 2048,
) -> torch.Tensor:
    """I(x; z) under q(z|x) = N(mean, exp(logvar)) for the N encoded inputs, in nats.

    I = E_x E_{z~q(z|x)} [log q(z|x) - log q(z)], with the aggregate posterior q(z) the mixture of
    all N encoders. The estimate cannot exceed log N, so N must be large next to exp(I). The draws
    come from `generator` on its own device (a tool's CUDA generator may score means kept on the CPU)
    and move to the means' device.
    """
    if mean.dim() != 2 or mean.shape != logvar.shape:
        raise ValueError(
            f"mean and logvar must both be [N, latent_dim], got {tuple(mean.shape)} and {tuple(logvar.shape)}"
        )
    mean, logvar = mean.double(), logvar.double()
    n = mean.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=mean.device)
    where = generator.device if generator is not None else mean.device
    for _ in range(samples):
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=where).to(mean.device)
        z = mean + torch.exp(0.5 * logvar) * noise
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            log_q = _pairwise_log_density(z[start:stop], mean, logvar)  # [chunk, N]
            total = total + _mi_terms(log_q, log_q[torch.arange(stop - start), torch.arange(start, stop)])
    return total / (n * samples)


@torch.no_grad()
def model_mutual_information(
    model: GenerativeModel, x: torch.Tensor, generator: torch.Generator | None = None, batch_size: int = 64
) -> torch.Tensor:
    """I(x; z) over the N images x in nats (at most log N), for a posterior without a closed form.

    Each image's draw z ~ q(z | x_i) is scored under every image's posterior (`posterior_log_prob`):
    for the iterative VAE, whose posterior is a chain of Gaussians with means depending on earlier
    draws, that is N^2 * T encoder passes, which is why callers cap N.
    """
    if x.shape[0] < 2:
        raise ValueError(f"the mutual information needs at least 2 images, got {x.shape[0]}")
    n = x.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        z = model.posterior_sample(x[i : i + 1], generator)
        row = torch.cat(
            [model.posterior_log_prob(x[j : j + batch_size], z) for j in range(0, n, batch_size)]
        ).double()
        total = total + _mi_terms(row[None], row[i : i + 1]).cpu()
    return total / n


@torch.no_grad()
def importance_weighted_log_likelihood(
    model: GenerativeModel, x: torch.Tensor, samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """log p(x) >= log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x): nats per image, [B].

    K = 1 is the ELBO (with a sampled KL); the bound tightens as K grows (Burda et al. 2016). The
    average over the K weights is a logsumexp, so no weight is ever exponentiated on its own.
    """
    if samples < 1:
        raise ValueError(f"importance samples must be >= 1, got {samples}")
    log_weights = torch.stack([model.log_importance_weight(x, generator) for _ in range(samples)])
    return torch.logsumexp(log_weights, dim=0) - math.log(samples)


def active_units(mean: torch.Tensor, threshold: float = 0.01) -> int:
    """Latent dimensions whose posterior mean varies across inputs: Var_x E_q[z_u] > threshold.

    A unit the decoder ignores has its posterior collapsed onto the prior for every x, so its mean
    no longer moves (Burda et al. 2016). `mean` is [N, latent_dim] over a data set.
    """
    if mean.dim() != 2 or mean.shape[0] < 2:
        raise ValueError(f"active_units needs posterior means [N >= 2, latent_dim], got {tuple(mean.shape)}")
    return int((mean.double().var(dim=0) > threshold).sum())


_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def laplacian_variance(images: torch.Tensor) -> torch.Tensor:
    """Sharpness of each image [B]: the variance of its grey-level Laplacian (blur lowers it).

    Images in [-1, 1]; comparing samples' values with the data's tells how fuzzy the samples are.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    grey = images.float().mean(dim=1, keepdim=True)
    kernel = _LAPLACIAN.to(grey.device)[None, None]
    return F.conv2d(grey, kernel).flatten(1).var(dim=1)


def sample_spread(draws: torch.Tensor) -> float:
    """The decoder's spread for a fixed code: draws [n_codes, n_draws, 3, H, W] of x ~ p(x|z) with one z
    per code; the per-pixel standard deviation across draws, averaged (in [-1, 1] units).

    Near 0: the decoder is (nearly) deterministic given z, so z carries the image; large: the
    autoregressive decoder makes up the image on its own.
    """
    if draws.dim() != 5 or draws.shape[1] < 2:
        raise ValueError(f"draws must be [n_codes, n_draws >= 2, 3, H, W], got {tuple(draws.shape)}")
    return draws.float().std(dim=1).mean().item()


@torch.no_grad()
def sample_spread_per_step(
    model: GenerativeModel, z: torch.Tensor, draws: int, generator: torch.Generator | None = None
) -> list[float]:
    """`sample_spread` of every generation step's output for the fixed codes z: `draws` decodings of
    each code, so a model whose later steps add detail shows where its randomness enters."""
    with evaluating(model):
        decoded = [model.decode(z, generator) for _ in range(draws)]
    return [sample_spread(torch.stack(step, dim=1)) for step in zip(*decoded, strict=True)]


@dataclass
class EvalPart:
    """What one process measured over its share of a split; `summarize` merges the shares."""

    images: int = 0
    elbo_bpd: float = 0.0  # sums over images
    kl: float = 0.0
    iw_bpd: float = 0.0
    iw_samples: int = 0
    means: list[torch.Tensor] = field(default_factory=list)  # posterior means (CPU), for active units
    logvars: list[torch.Tensor] = field(default_factory=list)  # Gaussian posteriors: with means, for MI
    mi: float | None = None  # other posteriors: over the first `mi_images` images of this share
    mi_images: int = 0


@torch.no_grad()
def accumulate(
    model: GenerativeModel,
    batches: Iterable[torch.Tensor],
    iw_samples: int = 0,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
    mi_images: int = 128,
) -> EvalPart:
    """Measure `model` (eval mode) over every image of `batches`; each image weighs the same whatever
    its batch's size. A posterior that is one Gaussian per image keeps its statistics for the
    closed-form MI in `summarize`; any other has its MI sampled here, over the first `mi_images`
    images, because that needs the images and the model."""
    param = next(model.parameters())
    part = EvalPart(iw_samples=iw_samples)
    kept: list[torch.Tensor] = []
    with evaluating(model):
        for x in batches:
            x = x.to(param)
            n = x.shape[0]
            scalars = model(x).scalars
            part.elbo_bpd += n * scalars.get("elbo_bpd", scalars["bpd"]).item()
            part.kl += n * scalars["kl"].item()
            posterior = model.posterior(x)
            part.means.append(posterior.mean.cpu())
            if posterior.logvar is not None:
                part.logvars.append(posterior.logvar.cpu())
            elif part.images < mi_images:
                kept.append(x[: mi_images - part.images])
            if iw_samples:
                nll = -importance_weighted_log_likelihood(model, x, iw_samples, generator)
                part.iw_bpd += logistic_mixture.bits_per_dim(nll, x[0].numel()).sum().item()
            part.images += n
            if progress is not None:
                progress(n)
        if kept and sum(k.shape[0] for k in kept) > 1:
            images = torch.cat(kept)
            part.mi = model_mutual_information(model, images, generator).item()
            part.mi_images = images.shape[0]
    return part


def summarize(
    parts: Sequence[EvalPart], generator: torch.Generator | None = None, mi_images: int = 4096
) -> dict[str, float | int | None]:
    """Merge the processes' shares (in rank order) into the split's numbers: 'images', 'elbo_bpd'
    (bits/dim of -ELBO), 'kl' (nats per image), 'iw_bpd' (None without importance samples), 'mi'
    (nats) with 'mi_images' (the N it used: the estimate is at most log N), 'active_units' and
    'latent_dim' (the iterative VAE's code is all T steps' latents). The closed-form MI of Gaussian
    posteriors uses the first `mi_images` of them: its pairwise cost grows as N^2."""
    count = sum(p.images for p in parts)
    if count == 0:
        raise ValueError("evaluate was given no images")
    iw = parts[0].iw_samples
    means = torch.cat([m for p in parts for m in p.means])
    result: dict[str, float | int | None] = {
        "images": count,
        "elbo_bpd": sum(p.elbo_bpd for p in parts) / count,
        "kl": sum(p.kl for p in parts) / count,
        "iw_bpd": sum(p.iw_bpd for p in parts) / count if iw else None,
        "iw_samples": iw or None,
        "mi": parts[0].mi,
        "mi_images": parts[0].mi_images or None,
        "active_units": active_units(means) if count > 1 else None,
        "latent_dim": means.shape[1],
    }
    logvars = [v for p in parts for v in p.logvars]
    if logvars and count > 1:
        n = min(count, mi_images)
        result["mi"] = mutual_information(means[:n], torch.cat(logvars)[:n], generator=generator).item()
        result["mi_images"] = n
    return result


def evaluate(
    model: GenerativeModel,
    batches: Iterable[torch.Tensor],
    iw_samples: int = 0,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float | int | None]:
    """`summarize` of one process's `accumulate` over a whole split, with the default MI caps."""
    return summarize([accumulate(model, batches, iw_samples, generator, progress)], generator)
