"""Building blocks of the causal PixelCNN++: weight-normed shifted convolutions and gated resnets.

Causality comes from padding alone: a "down-shifted" convolution sees only rows above (and the
current row, which `down_shift` then removes), a "down-right-shifted" one only pixels above and to
the left. Keeping every block a plain padded convolution with a fixed receptive field is what makes
a cached (incremental) sampler possible later.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dist_vae.models.fused_ops import gated_residual, padded_concat_elu, skip_sum
from dist_vae.models.weight_norm import Weights, WNConv2d, nin

__all__ = ["WNConv2d", "nin"]  # with the blocks below, what pixelcnnpp builds from


def concat_elu(x: torch.Tensor) -> torch.Tensor:
    """ELU of x and -x side by side: keeps both signs' information at twice the channels."""
    return F.elu(torch.cat([x, -x], dim=1))


def down_shift(x: torch.Tensor) -> torch.Tensor:
    """Move every row one down (zero row on top), so a pixel no longer sees its own row."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def right_shift(x: torch.Tensor) -> torch.Tensor:
    """Move every column one right (zero column on the left)."""
    return F.pad(x, (1, 0))[..., :-1]


class FrozenConv:
    """A shifted convolution with its weights fixed, evaluated on the window of its zero-padded input
    that one output row segment reads: what the incremental (cached) sampler computes per step."""

    def __init__(self, conv: WNConv2d, top: int, left: int) -> None:
        self.weight, self.bias = conv.frozen()
        # The bias in the weight's dtype (autocast's, when frozen under it) for this class's own
        # convolution and matrix product, which autocast would otherwise cast to it at every call.
        self.own_bias = self.bias.to(self.weight.dtype)
        self.stride, self.top, self.left = conv.stride, top, left
        self.kh, self.kw = self.weight.shape[-2:]
        self.matrix = self.weight.flatten(1).T.contiguous()

    def window(self, r: int, c0: int, c1: int) -> tuple[int, int, int, int]:
        """Input rows and columns (first, last; inclusive, -1 is the zero padding) that output row r,
        columns c0..c1 read."""
        s = self.stride
        top, left = s * r - self.top, s * c0 - self.left
        return top, top + self.kh - 1, left, s * c1 - self.left + self.kw - 1

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        if window.shape[-1] == self.kw:  # one output position: a matrix product, far cheaper than conv2d
            return torch.addmm(self.own_bias, window.reshape(window.shape[0], -1), self.matrix)[
                :, :, None, None
            ]
        return F.conv2d(window, self.weight, self.own_bias, stride=self.stride)


class ShiftedConv2d(nn.Module):
    """A convolution on its input zero-padded by `padding` = (left, right, top, bottom)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: tuple[int, int],
        stride: int,
        padding: tuple[int, int, int, int],
    ) -> None:
        super().__init__()
        self.padding = padding
        self.conv = WNConv2d(in_ch, out_ch, kernel, stride)

    def forward(self, x: torch.Tensor, weights: Weights | None = None) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding), weights)

    def on_concat_elu(
        self,
        x: torch.Tensor,
        drop: torch.Tensor | None = None,
        dropout: float = 0.0,
        weights: Weights | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """forward(concat_elu(x) * ~drop / (1 - dropout)), its input built in one padded buffer; `bias`
        in place of the convolution's own."""
        return self.conv(padded_concat_elu((x,), self.padding, drop, dropout), weights, bias)

    def frozen(self) -> FrozenConv:
        return FrozenConv(self.conv, top=self.padding[2], left=self.padding[0])


class DownShiftedConv2d(ShiftedConv2d):
    """Output (i, j) sees input rows <= i, columns j-k..j+k: causal once followed by `down_shift`."""

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int] = (2, 3), stride: int = 1) -> None:
        kh, kw = kernel
        super().__init__(in_ch, out_ch, kernel, stride, ((kw - 1) // 2, (kw - 1) // 2, kh - 1, 0))


class DownRightShiftedConv2d(ShiftedConv2d):
    """Output (i, j) sees input rows <= i and columns <= j."""

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int] = (2, 2), stride: int = 1) -> None:
        kh, kw = kernel
        super().__init__(in_ch, out_ch, kernel, stride, (kw - 1, 0, kh - 1, 0))


class DownShiftedDeconv2d(nn.Module):
    """Stride-2 upsampling that keeps the down-shifted stream's causality (crop bottom and sides)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int] = (2, 3)) -> None:
        super().__init__()
        self.kernel = kernel
        self.deconv = WNConv2d(in_ch, out_ch, kernel, stride=2, transpose=True)

    def _columns(self, width: int) -> slice:
        side = (self.kernel[1] - 1) // 2
        return slice(side, width - side)

    def crop(self, out: torch.Tensor) -> torch.Tensor:
        """The transposed convolution's output cut back to twice the input's size, causally."""
        return out[:, :, : out.shape[2] - self.kernel[0] + 1, self._columns(out.shape[3])]

    def forward(self, x: torch.Tensor, weights: Weights | None = None) -> torch.Tensor:
        return self.crop(self.deconv(x, weights))

    def frozen(self) -> FrozenDeconv:
        return FrozenDeconv(self)


class DownRightShiftedDeconv2d(DownShiftedDeconv2d):
    """Stride-2 upsampling for the down-right-shifted stream (crop bottom and right)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int] = (2, 2)) -> None:
        super().__init__(in_ch, out_ch, kernel)

    def _columns(self, width: int) -> slice:
        return slice(0, width - self.kernel[1] + 1)


class FrozenDeconv:
    """A causal stride-2 upsampling with its weights fixed, for the incremental sampler.

    Output row r receives input row r // 2 alone, so `row` runs on that one input row. With a 2x2
    kernel output (r, c) also receives input (r // 2, c // 2) alone, through kernel tap (r % 2, c % 2):
    `position` is then a matrix product.
    """

    def __init__(self, module: DownShiftedDeconv2d) -> None:
        self.crop = module.crop
        self.weight, self.bias = module.deconv.frozen()

    def row(self, source: torch.Tensor, r: int) -> torch.Tensor:
        """Output row r [B, C, 1, 2W] from input row r // 2 [B, C, 1, W]."""
        out = self.crop(F.conv_transpose2d(source, self.weight, self.bias, stride=2, output_padding=1))
        return out[:, :, r % 2 : r % 2 + 1]

    def position(self, source: torch.Tensor, r: int, c: int) -> torch.Tensor:
        """Output (r, c) [B, C, 1, 1] from input (r // 2, c // 2) [B, C] (2x2 kernels only)."""
        if self.weight.shape[-2:] != (2, 2):
            raise ValueError(f"position() needs a 2x2 kernel, got {tuple(self.weight.shape[-2:])}")
        return (source @ self.weight[:, :, r % 2, c % 2] + self.bias)[:, :, None, None]


def gated_sum(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x + a * sigmoid(b) for h = [a, b]: the gated resnet's output."""
    a, b = h.chunk(2, dim=1)
    return x + a * torch.sigmoid(b)


class GatedResnet(nn.Module):
    """x + gate: conv(concat_elu(x)) (+ skip inputs) -> conv -> (+ z bias) -> a * sigmoid(b).

    `skips` are the U-net / stream inputs; they are concatenated inside the block so that under
    gradient checkpointing only the block's inputs are kept alive, never the concatenation. The
    latent z enters as a learned per-channel bias (the same at every pixel, so causality holds).

    With `gradient_checkpointing` the block keeps only its inputs and recomputes the rest in
    backward. The dropout mask is drawn outside the checkpoint and passed in (one byte per value):
    recomputing it would mean replaying the RNG, a large share of the step on a CPU. (Keeping the
    convolutions' outputs too, via selective checkpointing, would double the memory.) Loss and
    gradients are exactly those without checkpointing.
    """

    def __init__(
        self,
        filters: int,
        conv: type[ShiftedConv2d],
        n_skip: int = 0,
        cond_dim: int | None = None,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.conv_in = conv(2 * filters, filters)
        self.skip = nin(2 * n_skip * filters, filters) if n_skip else None
        self.dropout = dropout
        self.conv_out = conv(2 * filters, 2 * filters)
        self.cond = nn.Linear(cond_dim, 2 * filters) if cond_dim else None
        self.gradient_checkpointing = gradient_checkpointing

    def _block(
        self,
        x: torch.Tensor,
        z: torch.Tensor | None,
        drop: torch.Tensor | None,
        *skips: torch.Tensor,
        cond: torch.Tensor | None = None,
        weights: Weights | None = None,
    ) -> torch.Tensor:
        if self.skip is None:
            h = self.conv_in.on_concat_elu(x, weights=weights)
        else:  # the skip's 1x1 convolution adds into conv_in's output, its bias into conv_in's
            h = self.conv_in.on_concat_elu(x, weights=weights, bias=self.conv_in.conv.bias + self.skip.bias)
            h = skip_sum(h, self.skip.weight() if weights is None else weights[self.skip], skips)
        h = self.conv_out.on_concat_elu(h, drop, self.dropout, weights)
        if self.cond is not None and cond is None:
            cond = self.cond(z)[:, :, None, None]
        return gated_residual(x, h, cond)

    def forward(
        self,
        x: torch.Tensor,
        skips: tuple[torch.Tensor, ...] = (),
        z: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        weights: Weights | None = None,
        threshold: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The block on x; `cond` (its latent bias [B, 2F, 1, 1]) and `weights` (its convolutions'),
        when given, are this forward's, computed by the caller for all blocks at once: the recomputation
        under checkpointing then reuses them rather than computing them again. `threshold`: the
        dropout probability as a float32 tensor, made once per forward by the caller (a Python number
        is converted to a tensor at each comparison)."""
        drop = None
        if self.training and self.dropout > 0:
            b, c, h, w = x.shape
            noise = torch.empty(b, 2 * c, h, w, device=x.device).uniform_()  # torch.rand's draws
            drop = noise < (self.dropout if threshold is None else threshold)
        inputs = {"cond": cond, "weights": weights}
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._block, x, z, drop, *skips, use_reentrant=False, **inputs)
        return self._block(x, z, drop, *skips, **inputs)

    def frozen(self, z: torch.Tensor | None) -> FrozenGatedResnet:
        return FrozenGatedResnet(self, z)


class FrozenGatedResnet:
    """A gated resnet with its weights (and its latent bias for a given z) fixed, in two halves for the
    incremental sampler, which caches the hidden map between them: the second convolution reads a
    window of it."""

    def __init__(self, block: GatedResnet, z: torch.Tensor | None) -> None:
        self.conv_in, self.conv_out = block.conv_in.frozen(), block.conv_out.frozen()
        # The 1x1 skip convolution as a matrix over channels (cheaper than conv2d on a few positions).
        self.skip = None if block.skip is None else FrozenConv(block.skip, 0, 0)
        self.cond = None if block.cond is None else block.cond(z).detach()[:, :, None, None]

    def hidden(self, conv_in: torch.Tensor, skips: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The first half's output from conv_in(concat_elu(x)) and the skip inputs at the same positions."""
        if self.skip is None:
            return conv_in
        skip = concat_elu(torch.cat(skips, dim=1)).movedim(1, -1) @ self.skip.matrix + self.skip.bias
        return conv_in + skip.movedim(-1, 1)

    def output(self, x: torch.Tensor, conv_out: torch.Tensor) -> torch.Tensor:
        """The block's output from its input x and conv_out(concat_elu(hidden)) at the same positions."""
        return gated_sum(x, conv_out if self.cond is None else conv_out + self.cond)
