"""Numbers that describe a trained model's codes; everything in nats, computed in log space.

The Generalized-PixelVAE code estimates I(x; z) by multiplying Gaussian densities, which underflows
to 0 (and the estimate to nan) once z has a few tens of dimensions; here every density stays a
log-density and the aggregate posterior is a logsumexp.
"""

from __future__ import annotations

import math

import torch

from dist_vae.models.regularizers import gaussian_kl

__all__ = ["gaussian_kl", "mutual_information"]


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
