"""The iterative VAE's networks: per-step encoder q(z_t | x, canvas_{t-1}) and generator
p(canvas_t | z_t, canvas_{t-1}), built from GroupNorm residual stages over a pyramid of levels."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dist_vae.models.fused_ops import concat

LATENT_GRID = 8  # latents are read from and written to feature maps pooled/broadcast at most this side


def level_width(size: int, channels: int) -> int:
    """Channels at a level: `channels` at 64 px, doubling per halving up to 4x, halving above 64 px.

    Narrow fine levels keep 256-px activations affordable; wide coarse levels hold the layout.
    """
    return max(1, min(4 * channels, channels * 64 // size))


def fold_matrix() -> torch.Tensor:
    """[9, 16]: maps a 3x3 kernel's taps to the 4x4 stride-2 transposed-convolution kernel that equals
    nearest 2x upsampling followed by that convolution (`upsample_conv`).

    Along each axis, output pixel 2i reads rows i-1, i, i of h (taps 0 | 1+2) and pixel 2i+1 rows
    i, i, i+1 (taps 0+1 | 2): sums of neighbouring taps of the zero-padded kernel, [0, 0+1, 1+2, 2],
    which in the transposed convolution's (flipped) order puts tap r at positions a with r in {2-a, 3-a}.
    """
    axis = torch.tensor([[float(r in (2 - a, 3 - a)) for a in range(4)] for r in range(3)])
    return torch.kron(axis, axis)  # [(r, c), (a, b)]


def folded_weights(convs: Sequence[nn.Conv2d], fold: torch.Tensor) -> list[torch.Tensor]:
    """`upsample_conv`'s weights [in, out, 4, 4] for several 3x3 convs, folded by one matrix product
    (sums of 0/1-weighted taps: exact up to summation order)."""
    if not convs:
        return []
    with torch.autocast(fold.device.type, enabled=False):  # fold the fp32 weights, then let conv cast
        flat = concat(conv.weight.reshape(-1, 9) for conv in convs) @ fold
    sizes = [conv.weight.shape[0] * conv.weight.shape[1] for conv in convs]
    return [
        part.view(*conv.weight.shape[:2], 4, 4).transpose(0, 1)
        for conv, part in zip(convs, flat.split(sizes), strict=True)
    ]


def upsample_conv(h: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor | None = None) -> torch.Tensor:
    """conv(nearest 2x upsampling of h) for a 3x3, padding-1 conv, without the upsampled map.

    Each output pixel of that pair reads a 2x2 window of h through sums of the 3x3 taps that land on
    the same pixel of h: a stride-2 transposed convolution with a 4x4 kernel (`weight`, from
    `folded_weights`; folded here when None), 4 taps per output pixel instead of 9, and no 4x-sized
    input written and read back. Equal up to summation order (1e-15 relative in float64); the
    parameters stay the 3x3 conv's, so checkpoints load unchanged.
    """
    if weight is None:
        weight = folded_weights([conv], fold_matrix().to(conv.weight))[0]
    return F.conv_transpose2d(h, weight, conv.bias, stride=2, padding=1)


def fine_levels(sizes: Sequence[int]) -> int:
    """How many of the finest levels gradient checkpointing recomputes: those wider than a quarter of
    the image's side.

    Every level costs about the same convolution FLOPs (4x fewer pixels, 2x the channels, squared) but
    holds half the activations of the one above it, so the two finest levels hold about three quarters
    of a step's activations and only their share of its FLOPs and operations. At 256 px, batch 1,
    recomputing them alone keeps 279 MiB per image (706 MiB without checkpointing) for 26k aten
    operations per step; recomputing whole steps, keeping the coarse convolutions' outputs, would keep
    94 MiB but dispatch the coarse levels' many small operations twice: 43k operations.
    """
    return sum(4 * side > sizes[0] for side in sizes)


def recomputed(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) with its activations dropped after forward and recomputed in backward (bitwise the
    same: no randomness inside, so no RNG state is stashed)."""
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


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

    def _levels(self, h: torch.Tensor, start: int, stop: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Levels start..stop-1 from the map entering level `start`: their features, and the map
        entering level `stop` (the step down included)."""
        features = []
        for i in range(start, stop):
            h = self.stages[i](h)
            features.append(h)
            if i < len(self.down):
                h = self.down[i](h)
        return features, h

    def _fine(self, x: torch.Tensor, stop: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self._levels(self.stem(x), 0, stop)

    def forward(self, x: torch.Tensor, fine: int = 0) -> list[torch.Tensor]:
        """The feature map of every level, finest first; the first `fine` levels `recomputed`."""
        features, h = recomputed(self._fine, x, fine) if fine else ([], self.stem(x))
        return features + self._levels(h, fine, len(self.stages))[0]


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

    def forward(
        self, x: torch.Tensor, canvas: torch.Tensor, fine: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of all ladder latents, concatenated in ladder order."""
        features = self.path(torch.cat([x, canvas], dim=1), fine)
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
        # A constant, not state: outside the state dict, moved and cast with the weights.
        self.register_buffer("fold", fold_matrix(), persistent=False)

    def _latent_map(self, level: int, z: torch.Tensor) -> torch.Tensor:
        grid = min(self.sizes[level], LATENT_GRID)
        h = self.inject[str(level)](z).view(z.shape[0], self.widths[level], grid, grid)
        return F.interpolate(h, size=self.sizes[level], mode="nearest") if grid < self.sizes[level] else h

    def _level(
        self,
        h: torch.Tensor | None,
        level: int,
        zs: dict[int, torch.Tensor],
        skips: list[torch.Tensor] | None,
        ups: list[torch.Tensor],
    ) -> torch.Tensor:
        """One level of the U-Net: the upsampled coarser map (none at the coarsest), plus the canvas
        skip and the latent map where there are, through the level's stage."""
        if h is not None:
            h = upsample_conv(h, self.up[level], ups[level])
        parts = [] if h is None else [h]
        if skips is not None:
            parts.append(skips[level])
        if level in zs:
            parts.append(self._latent_map(level, zs[level]))
        return self.stages[level](sum(parts[1:], parts[0]))

    def _fine(
        self,
        h: torch.Tensor | None,
        zs: dict[int, torch.Tensor],
        skips: list[torch.Tensor] | None,
        ups: list[torch.Tensor],
        canvas: torch.Tensor | None,
        fine: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The levels fine-1..0 (none for 0) and the output: the new canvas in [-1, 1] and the gate."""
        for level in reversed(range(fine)):
            h = self._level(h, level, zs, skips, ups)
        out = self.out(h)
        if canvas is None:
            return torch.tanh(out), None
        new, gate = torch.tanh(out[:, :3]), torch.sigmoid(out[:, 3:])
        # gate * new + (1 - gate) * canvas in one pass: a convex mix of two images in [-1, 1] stays there.
        dtype = torch.promote_types(new.dtype, canvas.dtype)
        return torch.lerp(canvas.to(dtype), new.to(dtype), gate.to(dtype)), gate

    def forward(
        self, z: torch.Tensor, canvas: torch.Tensor | None, fine: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """New canvas in [-1, 1] and the gate (None for the first step); the `fine` finest levels and
        the output `recomputed` when fine > 0."""
        zs = dict(zip(self.ladder, z.split(list(self.ladder.values()), dim=1), strict=True))
        skips = self.canvas_path(canvas, fine) if self.canvas_path is not None else None
        ups = folded_weights(self.up, self.fold)  # once per forward, never recomputed
        h: torch.Tensor | None = None
        for level in reversed(range(fine, len(self.sizes))):
            h = self._level(h, level, zs, skips, ups)
        if fine:
            return recomputed(self._fine, h, zs, skips, ups, canvas, fine)
        return self._fine(h, zs, skips, ups, canvas, 0)
