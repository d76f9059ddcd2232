"""Numbers that judge a trained model: likelihood bounds over a split, use of the code, sharpness.

Likelihoods are in nats inside and bits/dim when reported; every density stays a log-density.

The Generalized-PixelVAE code estimates I(x; z) by multiplying Gaussian densities, which underflows
to 0 (and the estimate to nan) once z has a few tens of dimensions; here every density stays a
log-density and the aggregate posterior is a logsumexp.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from dist_vae.models import logistic_mixture
from dist_vae.models.iterative_vae import IterativeVAE
from dist_vae.models.pixel_vae import PixelVAE
from dist_vae.models.regularizers import gaussian_kl

__all__ = [
    "active_units",
    "evaluate",
    "gaussian_kl",
    "importance_weighted_log_likelihood",
    "laplacian_variance",
    "mutual_information",
    "sample_spread",
]

_LOG_2PI = math.log(2.0 * math.pi)


def _pairwise_log_density(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z_i; mean_j, diag exp(logvar_j)) for every pair, [len(z), len(mean)]."""
    inv_var = torch.exp(-logvar)
    mahalanobis = z.square() @ inv_var.T - 2.0 * z @ (mean * inv_var).T + (mean.square() * inv_var).sum(dim=1)
    return -0.5 * (mahalanobis + logvar.sum(dim=1) + z.shape[1] * math.log(2.0 * math.pi))


def mutual_information(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    samples: int = 1,
    generator: torch.Generator | None = None,
    chunk: int = 2048,
) -> torch.Tensor:
    """I(x; z) under q(z|x) = N(mean, exp(logvar)) for the N encoded inputs, in nats.

    I = E_x E_{z~q(z|x)} [log q(z|x) - log q(z)], with the aggregate posterior q(z) the mixture of
    all N encoders. The estimate cannot exceed log N, so N must be large next to exp(I).
    """
    if mean.dim() != 2 or mean.shape != logvar.shape:
        raise ValueError(
            f"mean and logvar must both be [N, latent_dim], got {tuple(mean.shape)} and {tuple(logvar.shape)}"
        )
    mean, logvar = mean.double(), logvar.double()
    n = mean.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=mean.device)
    for _ in range(samples):
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        z = mean + torch.exp(0.5 * logvar) * noise
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            log_q = _pairwise_log_density(z[start:stop], mean, logvar)  # [chunk, N]
            own = log_q[torch.arange(stop - start), torch.arange(start, stop)]
            aggregate = torch.logsumexp(log_q, dim=1) - math.log(n)
            total = total + (own - aggregate).sum()
    return total / (n * samples)


def _diag_normal_log_density(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((z - mean).square() * torch.exp(-logvar) + logvar + _LOG_2PI).sum(dim=1)


@torch.no_grad()
def importance_weighted_log_likelihood(
    model: PixelVAE, x: torch.Tensor, samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """log p(x) >= log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x): nats per image, [B].

    K = 1 is the ELBO (with a sampled KL); the bound tightens as K grows (Burda et al. 2016). The
    average over the K weights is a logsumexp, so no weight is ever exponentiated on its own.
    """
    if samples < 1:
        raise ValueError(f"importance samples must be >= 1, got {samples}")
    mean, logvar = model.encode(x)
    log_weights = []
    for _ in range(samples):
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * logvar) * noise
        log_px = logistic_mixture.log_prob(x, model.decoder(x, z.to(x.dtype)))
        log_pz = _diag_normal_log_density(z, torch.zeros_like(z), torch.zeros_like(z))
        log_weights.append(log_px.to(z.dtype) + log_pz - _diag_normal_log_density(z, mean, logvar))
    return torch.logsumexp(torch.stack(log_weights), dim=0) - math.log(samples)


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
def evaluate(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    iw_samples: int = 0,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float | int | None]:
    """Metrics over every image of `batches` (a whole split; each image weighs the same whatever its
    batch's size), in eval mode: 'elbo_bpd' (bits/dim of -ELBO), 'kl' (nats per image), 'images',
    and for a PixelVAE also 'iw_bpd' (K = iw_samples; None when 0), 'mi' (nats), 'active_units',
    'latent_dim'. The iterative VAE's latents depend on its canvas, so it has no single q(z|x):
    'iw_bpd', 'mi' and 'active_units' are None for it. `progress(n)` is told each batch's size.
    """
    if not isinstance(model, PixelVAE | IterativeVAE):
        raise TypeError(f"evaluate supports PixelVAE and IterativeVAE, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    totals = {"elbo_bpd": 0.0, "kl": 0.0, "iw_bpd": 0.0}
    means, logvars, count = [], [], 0
    try:
        for x in batches:
            x = x.to(param)
            n = x.shape[0]
            scalars = model(x).scalars
            totals["elbo_bpd"] += n * scalars.get("elbo_bpd", scalars["bpd"]).item()
            totals["kl"] += n * scalars["kl"].item()
            if isinstance(model, PixelVAE):
                mean, logvar = model.encode(x)
                means.append(mean.cpu())
                logvars.append(logvar.cpu())
                if iw_samples:
                    nll = -importance_weighted_log_likelihood(model, x, iw_samples, generator)
                    totals["iw_bpd"] += logistic_mixture.bits_per_dim(nll, x[0].numel()).sum().item()
            count += n
            if progress is not None:
                progress(n)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate was given no images")
    result: dict[str, float | int | None] = {
        "images": count,
        "elbo_bpd": totals["elbo_bpd"] / count,
        "kl": totals["kl"] / count,
        "iw_bpd": totals["iw_bpd"] / count if means and iw_samples else None,
        "iw_samples": iw_samples if means and iw_samples else None,
        "mi": None,
        "active_units": None,
        "latent_dim": None,
    }
    if means:
        mean, logvar = torch.cat(means), torch.cat(logvars)
        result["mi"] = mutual_information(mean, logvar, generator=generator).item()
        result["active_units"] = active_units(mean) if count > 1 else None
        result["latent_dim"] = mean.shape[1]
    return result
