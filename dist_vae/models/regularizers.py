"""Penalties on the codes: the per-sample KL, and divergences D(q(z) || p(z)) for p(z) = N(0, I).

The InfoVAE family replaces (part of) the per-sample KL, which with a PixelCNN decoder drives the
code to carry nothing, by a divergence between the *aggregate* posterior q(z) and the prior, which
keeps z samplable without forbidding it to depend on x. All three estimates below work on a batch
of codes z ~ q(z|x) (one per image) against the same number of prior draws.

Kernel sums are computed in fp32 with autocast off: in bf16 the differences between kernel values,
which are the whole signal, are at the level of the rounding error.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

_LOG_2PI = math.log(2.0 * math.pi)


def gaussian_kl_per_unit(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) of every unit in nats, [B, D] (fp32)."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) in nats per row, [B]."""
    return gaussian_kl_per_unit(mean, logvar).sum(dim=1)


def diag_normal_log_density(
    z: torch.Tensor, mean: torch.Tensor | None = None, logvar: torch.Tensor | None = None
) -> torch.Tensor:
    """log N(z; mean, diag exp(logvar)) per row [B]; the standard normal when mean and
    logvar are None. Computed in at least fp32 (autocast's bf16 would round the sum)."""
    dtype = torch.promote_types(z.dtype, torch.float32)
    z = z.to(dtype)
    if mean is None or logvar is None:
        return -0.5 * (z.square() + _LOG_2PI).sum(dim=1)
    mean, logvar = mean.to(dtype), logvar.to(dtype)
    return -0.5 * ((z - mean).square() * torch.exp(-logvar) + logvar + _LOG_2PI).sum(dim=1)


def mmd(z: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Unbiased squared MMD between two batches with a Gaussian kernel of bandwidth 2 * latent_dim.

    Under N(0, I) the squared distance between two codes is about 2 * latent_dim, so this bandwidth
    keeps the kernel away from 0 and 1 (where its gradients vanish) at any latent size.
    """
    n, dim = z.shape
    with torch.autocast(device_type=z.device.type, enabled=False):
        both = torch.cat([z, prior]).float()
        kernel = torch.exp(-torch.cdist(both, both).square() / (2.0 * dim))
        off_diagonal = 1.0 - torch.eye(n, device=z.device)
        kqq = (kernel[:n, :n] * off_diagonal).sum() / (n * (n - 1))
        kpp = (kernel[n:, n:] * off_diagonal).sum() / (n * (n - 1))
        return kqq + kpp - 2.0 * kernel[:n, n:].mean()


def stein(z: torch.Tensor) -> torch.Tensor:
    """Stein variational gradient (SVGD) towards N(0, I), as a loss whose value is the mean ||phi||^2.

    SVGD gives each code the direction phi(z_i) = 1/n sum_j [k(z_j, z_i) grad log p(z_j)
    + grad_{z_j} k(z_j, z_i)] (RBF kernel, median-heuristic bandwidth) that decreases KL(q || p)
    fastest in the kernel's space. The returned tensor's gradient w.r.t. z is -phi / n, so gradient
    descent moves the codes along phi; its value, the mean squared length of phi, goes to 0 as the
    codes match the prior and is what gets logged.
    """
    n = z.shape[0]
    with torch.autocast(device_type=z.device.type, enabled=False):
        particles = z.detach().float()
        sq_dist = torch.cdist(particles, particles).square()
        bandwidth = (sq_dist.median() / math.log(n + 1.0)).clamp(min=1e-6)
        kernel = torch.exp(-sq_dist / bandwidth)
        attraction = -kernel @ particles  # sum_j k(z_j, z_i) * grad log p(z_j), grad log p(z) = -z
        repulsion = (2.0 / bandwidth) * (particles * kernel.sum(dim=1, keepdim=True) - kernel @ particles)
        phi = (attraction + repulsion) / n
        surrogate = -(z.float() * phi).sum(dim=1).mean()
        return phi.square().sum(dim=1).mean() + (surrogate - surrogate.detach())


class Critic(nn.Module):
    """MLP on z telling prior draws (label 1) from codes (label 0).

    At its optimum the logit is log p(z) / q(z), so -E_q[logit] estimates KL(q(z) || p(z)).
    """

    def __init__(self, latent_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(-1)

    def loss(self, z: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """The critic's own objective; z is detached so no gradient reaches the encoder."""
        real, fake = self(prior), self(z.detach())
        return F.binary_cross_entropy_with_logits(
            real, torch.ones_like(real)
        ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))

    def divergence(self, z: torch.Tensor) -> torch.Tensor:
        """KL(q || p) estimate for the encoder: gradient reaches z only, never the critic's weights."""
        frozen = {name: p.detach() for name, p in self.named_parameters()}
        return -functional_call(self, frozen, (z,)).mean()
