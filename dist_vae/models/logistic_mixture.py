"""Discretized mixture of logistics over 8-bit RGB pixels (Salimans et al. 2017, PixelCNN++).

Each pixel has `nr_mix` components sharing one mixture weight across its three channels; within a
component green's mean shifts linearly with red, and blue's with red and green, so the colour
channels are dependent without a second network pass. The network emits `10 * nr_mix` channels per
pixel, laid out as [logits (n) | means (3n) | log-scales (3n) | coefficients (3n)], each block of 3n
ordered channel-major (r, g, b).

Everything is computed in fp32 with autocast off: the cdf differences of neighbouring bins lose all
precision in bf16/fp16, and mixed precision training would otherwise turn likelihoods into noise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LEVELS = 256
HALF_BIN = 1.0 / (LEVELS - 1)  # pixels live in [-1, 1] at a spacing of 2 / 255
MIN_LOG_SCALE = -7.0


def num_params(nr_mix: int) -> int:
    """Channels the network must emit for `nr_mix` components of an RGB pixel."""
    return 10 * nr_mix


def _unpack(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split [B, 10n, H, W] into logits [B,n,H,W] and means/log-scales/coeffs [B,3,n,H,W] (fp32).

    By one split and one unbind: their backward assembles the gradient in one operation each, where
    each indexing's backward writes its part into a tensor of zeros of the whole."""
    b, c, h, w = params.shape
    if c % 10:
        raise ValueError(
            f"mixture parameters need 10 * nr_mix channels, got {c} (shape {tuple(params.shape)})"
        )
    n = c // 10
    logits, rest = params.float().split([n, 9 * n], dim=1)
    means, log_scales, coeffs = rest.reshape(b, 3, 3, n, h, w).unbind(1)
    return logits, means, log_scales.clamp(min=MIN_LOG_SCALE), torch.tanh(coeffs)


def _check_shapes(x: torch.Tensor, params: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"x must be [B, 3, H, W] RGB in [-1, 1], got shape {tuple(x.shape)}")
    if params.shape[0] != x.shape[0] or params.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"mixture parameters {tuple(params.shape)} do not match x {tuple(x.shape)} in batch or H, W"
        )


def _component_means(means: torch.Tensor, coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-component means [B,3,n,H,W] with green/blue shifted by the (known) red/green values."""
    red, green = x[:, 0:1], x[:, 1:2]  # [B,1,H,W] broadcast over components
    (mean_r, mean_g, mean_b), (red_g, red_b, green_b) = means.unbind(1), coeffs.unbind(1)
    return torch.stack([mean_r, mean_g + red_g * red, mean_b + red_b * red + green_b * green], dim=1)


def pixel_log_prob(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Log-probability in nats of each pixel's RGB triple, [B, H, W]; x on the 256-level grid of [-1, 1]."""
    _check_shapes(x, params)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        logits, means, log_scales, coeffs = _unpack(params)
        xx = x.unsqueeze(2)  # [B,3,1,H,W]
        centred = xx - _component_means(means, coeffs, x)
        inv_scale = torch.exp(-log_scales)
        plus_in = inv_scale * (centred + HALF_BIN)
        minus_in = inv_scale * (centred - HALF_BIN)
        mid_in = inv_scale * centred
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(minus_in)
        # In a bin far out in a sharp logistic's tail the cdf difference underflows; the density at
        # the bin centre times the bin width is then the accurate value.
        log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
        inner = torch.where(
            cdf_delta > 1e-5,
            torch.log(cdf_delta.clamp(min=1e-12)),
            log_pdf_mid - math.log((LEVELS - 1) / 2),
        )
        # The edge bins take the whole tail: P(x <= -1 + half bin) and P(x >= 1 - half bin).
        log_channel = torch.where(
            xx < -0.999, F.logsigmoid(plus_in), torch.where(xx > 0.999, -F.softplus(minus_in), inner)
        )
        log_joint = log_channel.sum(dim=1) + torch.log_softmax(logits, dim=1)  # [B,n,H,W]
        return torch.logsumexp(log_joint, dim=1)


def log_prob(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of each image in nats, [B]."""
    return pixel_log_prob(x, params).sum(dim=(1, 2))


def bits_per_dim(nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Negative log-likelihood in nats per image -> bits per sub-pixel (the one unit in our logs)."""
    return nats / (num_dims * math.log(2.0))


def _quantize(x: torch.Tensor) -> torch.Tensor:
    return torch.round((x.clamp(-1.0, 1.0) + 1.0) * ((LEVELS - 1) / 2)) / ((LEVELS - 1) / 2) - 1.0


def sample(params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw [B, 3, H, W] on the 256-level grid, exactly from the distribution `log_prob` scores.

    Each channel is rounded to its bin before it conditions the next one, as `log_prob` conditions on
    the observed (discrete) red and green values.
    """
    with torch.autocast(device_type=params.device.type, enabled=False):
        logits, means, log_scales, coeffs = _unpack(params)
        n = logits.shape[1]

        def uniform(shape: torch.Size) -> torch.Tensor:
            u = torch.rand(shape, generator=generator, device=params.device)
            return u.clamp(1e-5, 1.0 - 1e-5)

        gumbel = -torch.log(-torch.log(uniform(logits.shape)))
        choice = F.one_hot((logits + gumbel).argmax(dim=1), n).permute(0, 3, 1, 2).unsqueeze(1)
        mean = (means * choice).sum(dim=2)  # [B,3,H,W]
        log_scale = (log_scales * choice).sum(dim=2)
        coeff = (coeffs * choice).sum(dim=2)
        u = uniform(mean.shape)
        noise = torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))
        red = _quantize(mean[:, 0] + noise[:, 0])
        green = _quantize(mean[:, 1] + noise[:, 1] + coeff[:, 0] * red)
        blue = _quantize(mean[:, 2] + noise[:, 2] + coeff[:, 1] * red + coeff[:, 2] * green)
        return torch.stack([red, green, blue], dim=1)
