"""Iterative latent-injection VAE: T refinement steps, each with its own encoder and generator.

Why: one Gaussian decoder averages every image that shares a code, so its samples are fuzzy. Here
generation runs T steps; step t draws fresh latents z_t and refines the canvas of step t-1 through a
per-pixel output gate, so each step's code only has to explain what the canvas still lacks and detail
is added step by step (Zhao, Song and Ermon 2017, "Towards deeper understanding of variational
autoencoding models").

Likelihood and 'bpd': the decoder is p(x | z_1..T) = N(x; canvas_T, sigma^2 I) with the variance FIXED
at sigma^2 = 1 / (2 rec_weight). A fixed variance keeps the per-step training term
rec_weight * ||x - canvas_t||^2 equal to that Gaussian's negative log density up to a constant, so the
logged bits/dim measure the objective being trained (a learned variance would report a better number
for a model trained on something else). The posterior q(z_t | x, canvas_{t-1}) depends on z_<t through
the canvas, so -ELBO = -log p(x | canvas_T) + sum_t KL_t; 'bpd' is that per dimension, in bits, with
the probability of an 8-bit bin taken as density times bin width (2/255, as the data stream maps uint8
k to k / 127.5 - 1; the bin is much narrower than sigma, so the error is negligible). The reconstructions
of earlier steps are auxiliary losses that shape the refinement and are not part of the bound.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dist_vae.models.output import LossOutput
from dist_vae.models.regularizers import diag_normal_log_density, gaussian_kl
from dist_vae.schema import ConfigError, at_least, choice

COARSEST = 4  # side in pixels of the lowest-resolution level
LATENT_GRID = 8  # latents are read from and written to feature maps pooled/broadcast at most this side
_BIN_NATS = math.log(127.5)  # -log of the width of one 8-bit bin in [-1, 1]


@dataclass
class IterativeVAEConfig:
    """model.kind=iterative_vae (defaults: LSUN 256 px, the seed's sizes)."""

    kind: str = "iterative_vae"
    refine_steps: int = at_least(8, 1)  # T; 1 with T-times larger latent_dims is the single-step baseline
    # One latent per level at the len(latent_dims) coarsest levels, the last at 4 px; drawn afresh per step.
    latent_dims: list[int] = field(default_factory=lambda: [20, 30, 30, 30])
    mode: str = choice("greedy", "greedy", "joint")  # greedy stops gradients between steps (the original)
    channels: int = at_least(64, 1)  # width at 64 px; x2 per halving up to x4, /2 per doubling above 64 px
    rec_weight: float = at_least(16.0, 1.0e-3)  # 1 / (2 sigma^2) of the fixed-variance Gaussian decoder
    kl_warmup: float = at_least(1.0e4, 0.0)  # KL weight is 1 - exp(-step / kl_warmup); 0 disables warm-up
    blocks: int = at_least(1, 1)  # residual blocks per resolution level in every encoder and generator


def level_sizes(resolution: int) -> list[int]:
    """Sides of the resolution levels, finest first: resolution, resolution/2, ..., 4."""
    if resolution < COARSEST or resolution & (resolution - 1):
        raise ConfigError(
            f"bad resolution {resolution} for model.kind=iterative_vae; expected a power of two >= {COARSEST}"
        )
    return [resolution >> i for i in range(int(math.log2(resolution // COARSEST)) + 1)]


def level_width(size: int, channels: int) -> int:
    """Channels at a level: `channels` at 64 px, doubling per halving up to 4x, halving above 64 px.

    Narrow fine levels keep 256-px activations affordable; wide coarse levels hold the layout.
    """
    return max(1, min(4 * channels, channels * 64 // size))


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, 32), channels)


class ResBlock(nn.Module):
    """Pre-activation residual block with GroupNorm (same behaviour in train and eval)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = _norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        # Zero-initialised last conv: every block starts as the identity, so depth does not destabilise.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(h))))))


def _stage(channels: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(*(ResBlock(channels) for _ in range(blocks)))


class DownPath(nn.Module):
    """Convolutional pyramid: returns the feature map of every level, finest first."""

    def __init__(self, in_channels: int, widths: Sequence[int], blocks: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.stages = nn.ModuleList(_stage(w, blocks) for w in widths)
        self.down = nn.ModuleList(
            nn.Conv2d(w, w_next, 3, stride=2, padding=1) for w, w_next in itertools.pairwise(widths)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.stem(x)
        features = []
        for i, stage in enumerate(self.stages):
            if i > 0:
                h = self.down[i - 1](h)
            h = stage(h)
            features.append(h)
        return features


class Encoder(nn.Module):
    """q(z_t | x, canvas_{t-1}): one diagonal Gaussian per ladder level, read from that level's features."""

    def __init__(
        self, sizes: Sequence[int], widths: Sequence[int], ladder: dict[int, int], blocks: int
    ) -> None:
        super().__init__()
        self.path = DownPath(6, widths, blocks)
        self.ladder = dict(ladder)
        self.heads = nn.ModuleDict()
        for level, dim in ladder.items():
            grid = min(sizes[level], LATENT_GRID)
            linear = nn.Linear(widths[level] * grid * grid, 2 * dim)
            # Zero-initialised: q starts at the prior, so the KL starts at 0 and z at pure noise.
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
            self.heads[str(level)] = nn.Sequential(
                _norm(widths[level]), nn.SiLU(), nn.AdaptiveAvgPool2d(grid), nn.Flatten(), linear
            )

    def forward(self, x: torch.Tensor, canvas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of all ladder latents, concatenated in ladder order."""
        features = self.path(torch.cat([x, canvas], dim=1))
        stats = [self.heads[str(level)](features[level]) for level in self.ladder]
        mean, raw_logvar = torch.cat(stats, dim=1).float().chunk(2, dim=1)
        # Soft bound on the log-variance keeps exp() finite under bf16/fp16 autocast.
        return mean, 8.0 * torch.tanh(raw_logvar / 8.0)


class Generator(nn.Module):
    """p(canvas_t | z_t, canvas_{t-1}): a U-Net from the coarsest level up, latents added at ladder levels.

    The first step has no canvas to refine and returns its output directly; later steps encode the
    previous canvas (skip connections per level) and mix new and old through the gate r in (0, 1).
    """

    def __init__(
        self, sizes: Sequence[int], widths: Sequence[int], ladder: dict[int, int], blocks: int, refine: bool
    ) -> None:
        super().__init__()
        self.sizes = list(sizes)
        self.widths = list(widths)
        self.ladder = dict(ladder)
        self.canvas_path = DownPath(3, widths, blocks) if refine else None
        self.inject = nn.ModuleDict(
            {
                str(level): nn.Linear(dim, widths[level] * min(sizes[level], LATENT_GRID) ** 2)
                for level, dim in ladder.items()
            }
        )
        self.stages = nn.ModuleList(_stage(w, blocks) for w in widths)
        self.up = nn.ModuleList(
            nn.Conv2d(w_coarse, w, 3, padding=1) for w, w_coarse in itertools.pairwise(widths)
        )
        self.out = nn.Sequential(
            _norm(widths[0]), nn.SiLU(), nn.Conv2d(widths[0], 4 if refine else 3, 3, padding=1)
        )

    def _latent_map(self, level: int, z: torch.Tensor) -> torch.Tensor:
        grid = min(self.sizes[level], LATENT_GRID)
        h = self.inject[str(level)](z).view(z.shape[0], self.widths[level], grid, grid)
        return F.interpolate(h, size=self.sizes[level], mode="nearest") if grid < self.sizes[level] else h

    def forward(
        self, z: torch.Tensor, canvas: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """New canvas in [-1, 1] and the gate (None for the first step)."""
        zs = dict(zip(self.ladder, z.split(list(self.ladder.values()), dim=1), strict=True))
        skips = self.canvas_path(canvas) if self.canvas_path is not None else None
        h: torch.Tensor | None = None
        for level in reversed(range(len(self.sizes))):
            if h is not None:
                h = self.up[level](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            parts = [] if h is None else [h]
            if skips is not None:
                parts.append(skips[level])
            if level in zs:
                parts.append(self._latent_map(level, zs[level]))
            h = self.stages[level](sum(parts[1:], parts[0]))
        assert h is not None
        out = self.out(h)
        if canvas is None:
            return torch.tanh(out), None
        new, gate = torch.tanh(out[:, :3]), torch.sigmoid(out[:, 3:])
        # A convex mix of two images in [-1, 1] stays in [-1, 1].
        return gate * new + (1.0 - gate) * canvas, gate


@dataclass
class StepOutput:
    """One refinement step on a batch: the new canvas, per-example squared error and KL (nats), the
    mean gate (None for the first step), and the posterior q(z_t | x, canvas_{t-1}) with its draw z."""

    canvas: torch.Tensor
    sse: torch.Tensor
    kl: torch.Tensor
    gate: torch.Tensor | None
    mean: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor


class RefineStep(nn.Module):
    """Step t of the chain: its own encoder and generator (no weights shared across steps)."""

    def __init__(
        self, sizes: Sequence[int], widths: Sequence[int], ladder: dict[int, int], blocks: int, first: bool
    ) -> None:
        super().__init__()
        self.first = first
        self.encoder = Encoder(sizes, widths, ladder, blocks)
        self.generator = Generator(sizes, widths, ladder, blocks, refine=not first)

    def forward(self, x: torch.Tensor, canvas: torch.Tensor, eps: torch.Tensor) -> StepOutput:
        """Step t on a batch with z_t = mean + std * eps."""
        mean, logvar = self.encoder(x, canvas)
        z = mean + torch.exp(0.5 * logvar) * eps
        new_canvas, gate = self.generator(z, None if self.first else canvas)
        sse = (new_canvas.float() - x.float()).square().flatten(1).sum(dim=1)
        gate_mean = None if gate is None else gate.detach().float().flatten(1).mean(dim=1)
        return StepOutput(new_canvas, sse, gaussian_kl(mean, logvar), gate_mean, mean, logvar, z)


class IterativeVAE(nn.Module):
    """T-step iterative latent-injection Gaussian VAE; see the module docstring for the objective.

    `latent_dims[i]` is the size of the latent read and injected at the i-th of the len(latent_dims)
    coarsest levels (the last one at 4 px); every step draws all of them afresh. steps=1 with latent
    dims T times larger is the single-step baseline with the same total code size.
    """

    def __init__(
        self, cfg: IterativeVAEConfig, resolution: int, gradient_checkpointing: bool = False
    ) -> None:
        super().__init__()
        sizes = level_sizes(resolution)
        latent_dims = cfg.latent_dims
        if not 1 <= len(latent_dims) <= len(sizes) or min(latent_dims) < 1:
            raise ConfigError(
                f"bad value {list(latent_dims)} for 'model.latent_dims'; expected 1 to {len(sizes)} positive "
                f"sizes (one per level; {resolution} px has levels {sizes})"
            )
        self.resolution = resolution
        self.mode = cfg.mode
        self.gradient_checkpointing = gradient_checkpointing
        self.rec_weight = float(cfg.rec_weight)
        self.kl_warmup = float(cfg.kl_warmup)
        self.latent_size = int(sum(latent_dims))
        widths = [level_width(s, cfg.channels) for s in sizes]
        first_level = len(sizes) - len(latent_dims)
        ladder = {first_level + i: int(d) for i, d in enumerate(latent_dims)}
        self.steps = nn.ModuleList(
            RefineStep(sizes, widths, ladder, cfg.blocks, first=t == 0) for t in range(cfg.refine_steps)
        )

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"main": list(self.parameters())}

    def kl_weight(self, step: int) -> float:
        """The original's warm-up 1 - exp(-step / kl_warmup); the step comes from the engine."""
        return 1.0 if self.kl_warmup == 0 else 1.0 - math.exp(-step / self.kl_warmup)

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (3, self.resolution, self.resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"IterativeVAE expects images of shape [B, {', '.join(map(str, expected))}]; "
                f"got {list(x.shape)}"
            )

    def unroll(self, x: torch.Tensor, eps: Sequence[torch.Tensor] | None = None) -> list[StepOutput]:
        """Run the T steps on x with z_t = mean + std * eps[t] (eps drawn here when not given).

        Greedy mode detaches the canvas handed to the next step, so step t's loss trains step t alone;
        with checkpointing each step is recomputed in backward (noise is drawn outside, so identically).
        """
        self._check_input(x)
        canvas = torch.zeros_like(x)
        outputs = []
        for t, step in enumerate(self.steps):
            noise = eps[t] if eps is not None else torch.randn(x.shape[0], self.latent_size, device=x.device)
            previous = canvas.detach() if self.mode == "greedy" else canvas
            if self.gradient_checkpointing and torch.is_grad_enabled():
                out = checkpoint(step, x, previous, noise, use_reentrant=False)
            else:
                out = step(x, previous, noise)
            outputs.append(out)
            canvas = out.canvas
        return outputs

    def forward(self, x: torch.Tensor, step: int = 0) -> LossOutput:
        """Sum over steps of rec_weight * ||x - canvas_t||^2 + w(step) * KL_t, per dimension, batch mean.

        That is the original's per-step objective divided by the number of dimensions D, which keeps
        the loss scale (and thus clipping thresholds) independent of the resolution. Scalars (t from 1):
        'rec/step<t>' mean squared error per dimension, 'kl/step<t>' KL in nats per image,
        'gate/step<t>' mean gate r (t >= 2), their sums 'rec' and 'kl', 'kl_weight', and 'bpd'.
        """
        outputs = self.unroll(x)
        dims = x[0].numel()
        beta = self.kl_weight(step)
        loss = torch.stack([(self.rec_weight * o.sse + beta * o.kl).mean() for o in outputs]).sum() / dims
        scalars: dict[str, torch.Tensor] = {}
        for t, o in enumerate(outputs, start=1):
            scalars[f"rec/step{t}"] = o.sse.detach().mean() / dims
            scalars[f"kl/step{t}"] = o.kl.detach().mean()
            if o.gate is not None:
                scalars[f"gate/step{t}"] = o.gate.mean()
        scalars["rec"] = torch.stack([scalars[f"rec/step{t}"] for t in range(1, len(outputs) + 1)]).sum()
        total_kl = torch.stack([o.kl.detach() for o in outputs]).sum(0)
        scalars["kl"] = total_kl.mean()
        scalars["kl_weight"] = torch.tensor(beta, device=loss.device)
        nll = (-self._log_likelihood(outputs[-1].sse.detach(), dims) + total_kl).mean() / dims
        scalars["bpd"] = nll / math.log(2.0)
        return LossOutput(loss=loss, scalars=scalars)

    def _log_likelihood(self, sse: torch.Tensor, dims: int) -> torch.Tensor:
        """log P(x | z) in nats per image [B] of the 8-bit data under N(canvas_T, sigma^2 I), from the
        final step's squared error: each bin's probability is its density times the bin width."""
        return -self.rec_weight * sse - dims * (0.5 * math.log(math.pi / self.rec_weight) + _BIN_NATS)

    @torch.no_grad()
    def log_importance_weight(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """log p(x, z) - log q(z | x) in nats per image [B] for one draw z = z_1..T of the posterior.

        The joint posterior is the product of the steps' q(z_t | x, canvas_{t-1}), each a diagonal
        Gaussian once z_<t (hence the canvas) is fixed, so its log-density is the sum of theirs. Its
        mean over draws is the ELBO; a log-mean-exp over K draws is the importance-weighted bound.
        """
        self._check_input(x)
        outputs = self.unroll(x, self.noise(x.shape[0], generator, x.device))
        log_weight = self._log_likelihood(outputs[-1].sse, x[0].numel())
        for o in outputs:
            log_prior = diag_normal_log_density(o.z)
            log_weight = log_weight + log_prior - diag_normal_log_density(o.z, o.mean, o.logvar)
        return log_weight

    def noise(self, n: int, generator: torch.Generator | None, device: torch.device) -> list[torch.Tensor]:
        """T standard-normal draws [n, latent] on `device`, drawn by `generator` on its own device."""
        noise_device = generator.device if generator is not None else device
        return [
            torch.randn(n, self.latent_size, generator=generator, device=noise_device).to(device)
            for _ in self.steps
        ]

    @torch.no_grad()
    def posterior_log_prob(
        self, x: torch.Tensor, inputs: Sequence[torch.Tensor], z: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """log q(z_1..T | x_b) for every image x_b of the batch [B] and ONE draw: z[t] [1, latent] and
        the canvas inputs[t] [1, 3, R, R] it was drawn against (zeros, then canvas_1 .. canvas_{T-1}).

        The canvases depend on z alone (the generators never see x), so the same draw can be scored
        under every image's encoders: what the aggregate posterior q(z) in I(x; z) needs.
        """
        self._check_input(x)
        total = torch.zeros(x.shape[0], device=x.device)
        for step, canvas, z_t in zip(self.steps, inputs, z, strict=True):
            mean, logvar = step.encoder(x, canvas.expand_as(x))
            total = total + diag_normal_log_density(z_t.expand_as(mean), mean, logvar)
        return total

    @torch.no_grad()
    def posterior_means(self, x: torch.Tensor) -> torch.Tensor:
        """The steps' posterior means along the mean path (every z_t at its mean), concatenated:
        [B, T * latent], the codes whose spread across images counts active units."""
        zeros = [torch.zeros(x.shape[0], self.latent_size, device=x.device) for _ in self.steps]
        return torch.cat([o.mean for o in self.unroll(x, eps=zeros)], dim=1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Ancestral sampling: z_t ~ N(0, I) at every step; returns the T canvases, each [n, 3, R, R]."""
        canvas: torch.Tensor | None = None
        canvases = []
        for step, z in zip(self.steps, self.noise(n, generator, next(self.parameters()).device), strict=True):
            canvas, _ = step.generator(z, canvas)
            canvases.append(canvas.float())
        return canvases

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The T canvases decoded from the posterior means (deterministic)."""
        zeros = [torch.zeros(x.shape[0], self.latent_size, device=x.device) for _ in self.steps]
        return [o.canvas.float() for o in self.unroll(x, eps=zeros)]
