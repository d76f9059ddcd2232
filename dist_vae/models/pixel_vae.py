"""PixelVAE: a Gaussian encoder and a PixelCNN++ decoder conditioned on z, with InfoVAE weighting.

Objective per image, in nats (Zhao et al., InfoVAE):
    rec + (1 - alpha) * KL(q(z|x) || p(z)) + (alpha + lambda_ - 1) * D(q(z) || p(z))
with reg=elbo the plain ELBO (KL weight 1, no D) and reg=none the bare reconstruction. The loss
handed to the engine is that objective divided by the number of sub-pixels (nats per dim): a
constant factor, so the optimum is the same, but gradient sizes no longer grow with the resolution
(which would make one grad-clip threshold mean different things at 32 and 256 px).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dist_vae.models import logistic_mixture
from dist_vae.models.output import CodeStats, LossOutput
from dist_vae.models.pixelcnnpp import PixelCNNpp
from dist_vae.models.pixelcnnpp_cache import cached_decode
from dist_vae.models.protocol import Posterior, evaluating
from dist_vae.models.regularizers import Critic, diag_normal_log_density, gaussian_kl, mmd, stein
from dist_vae.schema import ConfigError, at_least, between, choice

LOGVAR_BOUND = 10.0


@dataclass
class PixelVAEConfig:
    """model.kind=pixel_vae: encoder + conditional PixelCNN++ decoder (defaults: LSUN 64 px)."""

    kind: str = "pixel_vae"
    reg: str = choice("mmd", "elbo", "none", "mmd", "stein", "adversarial")
    latent_dim: int = at_least(64, 1)
    nr_resnet: int = at_least(5, 1)
    nr_filters: int = at_least(160, 1)
    nr_mix: int = at_least(10, 1)
    n_stages: int = at_least(3, 1)
    dropout: float = between(0.5, 0.0, 0.99)
    encoder_channels: int = at_least(64, 1)
    # InfoVAE weighting: loss = rec + (1 - alpha) * KL + (alpha + lambda_ - 1) * D(q(z) || p(z)).
    # alpha = 1 drops the per-sample KL, which with a PixelCNN++ decoder makes z carry nothing.
    alpha: float = 1.0
    lambda_: float = 1000.0
    critic_hidden: int = at_least(256, 1)


class Encoder(nn.Module):
    """x [B,3,R,R] -> (mean, logvar) of z, for any R.

    Stride-2 convolutions halve the side until it is at most 8, then an adaptive average pool to 4x4
    is flattened into the linear head. Flattening a fixed 4x4 grid (rather than pooling globally)
    keeps where things are in the scene, which is much of what a code for LSUN rooms should hold,
    while the head's size stays the same at every resolution.
    """

    def __init__(self, resolution: int, channels: int, latent_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1), nn.SiLU()]
        side, width = resolution, channels
        while side > 8:
            wider = min(2 * width, 8 * channels)
            layers += [nn.Conv2d(width, wider, 4, stride=2, padding=1), nn.SiLU()]
            layers += [nn.Conv2d(wider, wider, 3, padding=1), nn.SiLU()]
            side, width = side // 2, wider
        layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(16 * width, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.head(self.body(x)).float().chunk(2, dim=1)
        # Bounded smoothly: with reg=none nothing holds the variance up, and an unbounded log-variance
        # would run to -inf (KL to inf) without changing what the decoder sees.
        return mean, LOGVAR_BOUND * torch.tanh(logvar / LOGVAR_BOUND)


class PixelVAE(nn.Module):
    """Encoder + conditional PixelCNN++; `model(x, step) -> LossOutput` as the engine expects."""

    def __init__(self, cfg: PixelVAEConfig, resolution: int, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        factor = 2 ** (cfg.n_stages - 1)
        if resolution % factor:
            raise ConfigError(
                f"data.resolution={resolution} must be divisible by 2**(model.n_stages-1) = {factor} "
                f"(model.n_stages={cfg.n_stages})"
            )
        self.resolution, self.latent_dim, self.reg = resolution, cfg.latent_dim, cfg.reg
        self.kl_weight = {"elbo": 1.0, "none": 0.0}.get(cfg.reg, 1.0 - cfg.alpha)
        self.reg_weight = cfg.alpha + cfg.lambda_ - 1.0
        self.encoder = Encoder(resolution, cfg.encoder_channels, cfg.latent_dim)
        self.decoder = PixelCNNpp(
            cfg.nr_resnet, cfg.nr_filters, cfg.nr_mix, cfg.n_stages, cfg.latent_dim, cfg.dropout,
            gradient_checkpointing,
        )  # fmt: skip
        self.critic = Critic(cfg.latent_dim, cfg.critic_hidden) if cfg.reg == "adversarial" else None

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        critic = [] if self.critic is None else list(self.critic.parameters())
        critic_ids = {id(p) for p in critic}
        groups = {"main": [p for p in self.parameters() if id(p) not in critic_ids]}
        if critic:
            groups["critic"] = critic
        return groups

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance (fp32) of q(z|x)."""
        return self.encoder(x)

    @torch.no_grad()
    def posterior(self, x: torch.Tensor) -> Posterior:
        return Posterior(*self.encode(x))

    @torch.no_grad()
    def posterior_sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean, logvar = self.encode(x)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    @torch.no_grad()
    def posterior_log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        mean, logvar = self.encode(x)
        return diag_normal_log_density(z.expand_as(mean), mean, logvar)

    @torch.no_grad()
    def log_importance_weight(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """log p(x | z) + log p(z) - log q(z | x) in nats per image [B] for one draw z ~ q(z|x): its mean
        over draws is the ELBO, a log-mean-exp over K draws the importance-weighted bound."""
        mean, logvar = self.encode(x)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * logvar) * noise
        log_px = logistic_mixture.log_prob(x, self.decoder(x, z.to(x.dtype)))
        return log_px.to(z.dtype) + diag_normal_log_density(z) - diag_normal_log_density(z, mean, logvar)

    def _divergence(self, z: torch.Tensor, aux: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.reg == "stein":
            return stein(z)
        prior = torch.randn_like(z)
        if self.reg == "mmd":
            return mmd(z, prior)
        assert self.critic is not None
        aux["critic"] = self.critic.loss(z, prior)
        return self.critic.divergence(z)

    def forward(self, x: torch.Tensor, step: int = 0) -> LossOutput:
        """Loss, logs and (reg=adversarial) the critic's loss. `step` is part of the shared model
        contract; this objective has no schedule, so it is unused."""
        if x.dim() != 4 or x.shape[1:] != (3, self.resolution, self.resolution):
            raise ValueError(
                f"PixelVAE expects x of shape [B, 3, {self.resolution}, {self.resolution}], "
                f"got {tuple(x.shape)}"
            )
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        rec = -logistic_mixture.log_prob(x, self.decoder(x, z))
        kl = gaussian_kl(mean, logvar)
        dims = x[0].numel()
        objective = rec.mean() + self.kl_weight * kl.mean()
        scalars = {
            "bpd": logistic_mixture.bits_per_dim(rec.mean(), dims).detach(),
            "elbo_bpd": logistic_mixture.bits_per_dim((rec + kl).mean(), dims).detach(),
            "kl": kl.mean().detach(),
        }
        aux: dict[str, torch.Tensor] = {}
        if self.reg not in ("elbo", "none"):
            divergence = self._divergence(z, aux)
            objective = objective + self.reg_weight * divergence
            scalars["reg"] = divergence.detach()
        if "critic" in aux:
            scalars["critic_loss"] = aux["critic"].detach()
        code = CodeStats.of_gaussian(mean, logvar, f"model.reg={self.reg}")
        return LossOutput(loss=objective / dims, scalars=scalars, aux_losses=aux, code=code)

    @torch.no_grad()
    def generate(
        self, z: torch.Tensor, generator: torch.Generator | None = None, cached: bool = True
    ) -> torch.Tensor:
        """x ~ p(x|z) [n, 3, R, R] in [-1, 1], pixel by pixel in eval mode (dropout off).

        Cached (`pixelcnnpp_cache`) or naive: one decoder pass per pixel, each on the rows up to the
        current one (rows below cannot influence it), rounded up to what the U-net's strides allow.
        Both draw the same samples from the same generator (up to floating-point summation order).
        """
        z = z.to(next(self.parameters()).dtype)
        with evaluating(self):
            if cached:
                return cached_decode(self.decoder, z, self.resolution, generator)
            n, side = z.shape[0], self.resolution
            factor = 2 ** (self.decoder.n_stages - 1)
            x = torch.zeros(n, 3, side, side, device=z.device, dtype=z.dtype)
            for i in range(side):
                rows = min(side, math.ceil((i + 1) / factor) * factor)
                for j in range(side):
                    params = self.decoder(x[:, :, :rows], z)[:, :, i : i + 1, j : j + 1]
                    x[:, :, i, j] = logistic_mixture.sample(params, generator)[:, :, 0, 0]
            return x

    def decode(self, z: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """One generation step: the cached sample."""
        return [self.generate(z, generator)]

    def prior_sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        param = next(self.parameters())
        noise_device = generator.device if generator is not None else param.device
        return torch.randn(n, self.latent_dim, generator=generator, device=noise_device).to(param)
