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

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dist_vae.models.iterative_nets import Encoder, Generator, fine_levels, level_width
from dist_vae.models.output import CodeStats, LossOutput
from dist_vae.models.protocol import Posterior
from dist_vae.models.regularizers import diag_normal_log_density, gaussian_kl, gaussian_kl_per_unit
from dist_vae.schema import ConfigError, at_least, choice

COARSEST = 4  # side in pixels of the lowest-resolution level
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


def squared_error(canvas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """||x - canvas||^2 per image (fp32) over the last three dimensions: [B] or, stacked, [T, B]."""
    return (canvas.float() - x.float()).square().flatten(-3).sum(-1)


@dataclass
class StepOutput:
    """One refinement step on a batch: the new canvas, the gate (detached; None for the first step),
    the posterior q(z_t | x, canvas_{t-1}) with its draw z, and the target x. `sse` and `kl` give the
    step's own terms; the loss computes all steps' at once (`IterativeVAE.forward`)."""

    canvas: torch.Tensor
    gate: torch.Tensor | None
    mean: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor
    x: torch.Tensor

    @property
    def sse(self) -> torch.Tensor:
        """Squared error per example [B]."""
        return squared_error(self.canvas, self.x)

    @property
    def kl(self) -> torch.Tensor:
        """KL(q(z_t | x, canvas_{t-1}) || N(0, I)) per example in nats [B]."""
        return gaussian_kl(self.mean, self.logvar)


class RefineStep(nn.Module):
    """Step t of the chain: its own encoder and generator (no weights shared across steps)."""

    def __init__(
        self, sizes: Sequence[int], widths: Sequence[int], ladder: dict[int, int], blocks: int, first: bool
    ) -> None:
        super().__init__()
        self.first = first
        self.encoder = Encoder(sizes, widths, ladder, blocks)
        self.generator = Generator(sizes, widths, ladder, blocks, refine=not first)

    def forward(self, x: torch.Tensor, canvas: torch.Tensor, eps: torch.Tensor, fine: int = 0) -> StepOutput:
        """Step t on a batch with z_t = mean + std * eps; its `fine` finest levels recomputed in backward."""
        mean, logvar = self.encoder(x, canvas, fine)
        z = mean + torch.exp(0.5 * logvar) * eps
        new_canvas, gate = self.generator(z, None if self.first else canvas, fine)
        return StepOutput(new_canvas, None if gate is None else gate.detach(), mean, logvar, z, x)


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
        self.fine = fine_levels(sizes)
        widths = [level_width(s, cfg.channels) for s in sizes]
        first_level = len(sizes) - len(latent_dims)
        ladder = {first_level + i: int(d) for i, d in enumerate(latent_dims)}
        self.steps = nn.ModuleList(
            RefineStep(sizes, widths, ladder, cfg.blocks, first=t == 0) for t in range(cfg.refine_steps)
        )

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"main": list(self.parameters())}

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """torch.compile each refinement step in place (regional compilation), not the whole unroll.

        Steps 2..T share one architecture, so they share one compiled graph (their weights are graph
        inputs): two graphs to build whatever T is, where the whole unrolled model as one graph grows
        with T and takes inductor far longer to build.
        """
        for step in self.steps:
            step.compile(*args, **kwargs)

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

        Greedy mode detaches the canvas handed to the next step, so step t's loss trains step t alone.
        With checkpointing each step but the last recomputes its finest levels in backward
        (`fine_levels`). The last step's backward comes first, right after its forward: recomputing
        it would save no memory, since backward holds one step's activations at a time anyway.
        """
        self._check_input(x)
        canvas = torch.zeros_like(x)
        outputs = []
        for t, step in enumerate(self.steps):
            noise = eps[t] if eps is not None else torch.randn(x.shape[0], self.latent_size, device=x.device)
            previous = canvas.detach() if self.mode == "greedy" else canvas
            recompute = self.gradient_checkpointing and t < len(self.steps) - 1 and torch.is_grad_enabled()
            out = step(x, previous, noise, self.fine if recompute else 0)
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
        dims, steps = x[0].numel(), len(outputs)
        beta = self.kl_weight(step)
        # Every step's terms at once, [T, B]: the same sums as step by step, in fewer operations.
        sse = squared_error(torch.stack([o.canvas.float() for o in outputs]), x)
        mean = torch.cat([o.mean for o in outputs], dim=1)
        logvar = torch.cat([o.logvar for o in outputs], dim=1)
        kl = gaussian_kl_per_unit(mean, logvar).view(x.shape[0], steps, -1).sum(2).T
        loss = (self.rec_weight * sse + beta * kl).mean(dim=1).sum() / dims
        rec_steps, kl_steps = sse.detach().mean(dim=1) / dims, kl.detach().mean(dim=1)
        scalars = {f"rec/step{t}": r for t, r in enumerate(rec_steps.unbind(), start=1)}
        scalars.update({f"kl/step{t}": k for t, k in enumerate(kl_steps.unbind(), start=1)})
        if steps > 1:
            gates = torch.stack([o.gate for o in outputs[1:]]).float().flatten(2).mean(2).mean(1)
            scalars.update({f"gate/step{t}": g for t, g in enumerate(gates.unbind(), start=2)})
        total_kl = kl.detach().sum(0)
        scalars["rec"], scalars["kl"] = rec_steps.sum(), total_kl.mean()
        scalars["kl_weight"] = torch.full((), beta, device=loss.device)
        nll = (-self._log_likelihood(sse[-1].detach(), dims) + total_kl).mean() / dims
        scalars["bpd"] = nll / math.log(2.0)
        # Every ladder latent of every step is one unit: D = T x sum(latent_dims), in `posterior()`'s
        # order, so a step or a level that stopped carrying information shows as its own units.
        regularizer = f"ELBO, KL weight {beta:.3g} (model.kl_warmup={self.kl_warmup:g})"
        return LossOutput(loss=loss, scalars=scalars, code=CodeStats.of_gaussian(mean, logvar, regularizer))

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

    @property
    def latent_dim(self) -> int:
        """The whole code: every step's latents, concatenated."""
        return len(self.steps) * self.latent_size

    def prior_sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.cat(self.noise(n, generator, next(self.parameters()).device), dim=1)

    def _paint(self, z: torch.Tensor) -> list[torch.Tensor]:
        """The T canvases the steps' generators paint from z = z_1..T."""
        canvas: torch.Tensor | None = None
        canvases = []
        for step, z_t in zip(self.steps, z.split(self.latent_size, dim=1), strict=True):
            canvas, _ = step.generator(z_t, canvas)
            canvases.append(canvas)
        return canvases

    @torch.no_grad()
    def decode(self, z: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """The T canvases (fp32) from z = z_1..T; deterministic given z, so `generator` is unused."""
        return [canvas.float() for canvas in self._paint(z)]

    @torch.no_grad()
    def posterior(self, x: torch.Tensor) -> Posterior:
        """The steps' posterior means along the mean path (every z_t at its mean); not one Gaussian."""
        zeros = [torch.zeros(x.shape[0], self.latent_size, device=x.device) for _ in self.steps]
        return Posterior(torch.cat([o.mean for o in self.unroll(x, eps=zeros)], dim=1), None)

    @torch.no_grad()
    def posterior_sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.cat([o.z for o in self.unroll(x, self.noise(x.shape[0], generator, x.device))], dim=1)

    @torch.no_grad()
    def posterior_log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log q(z_1..T | x_b) for every image x_b [B]: the sum of the steps' Gaussian log-densities,
        each against the canvas the earlier z_<t paint. Those canvases depend on z alone (the
        generators never see x), so one draw can be scored under every image's encoders: what the
        aggregate posterior q(z) in I(x; z) needs."""
        self._check_input(x)
        canvases = self._paint(z)
        inputs = [torch.zeros_like(canvases[0]), *canvases[:-1]]
        total = torch.zeros(x.shape[0], device=x.device)
        for step, canvas, z_t in zip(self.steps, inputs, z.split(self.latent_size, dim=1), strict=True):
            mean, logvar = step.encoder(x, canvas.expand_as(x))
            total = total + diag_normal_log_density(z_t.expand_as(mean), mean, logvar)
        return total
