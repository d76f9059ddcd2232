"""Weight-normalised convolutions, and the weights of many of them computed together once per forward.

Each weight is g * v / ||v|| per output channel. Computed inside every call, that is a norm, a product
and a quotient forward and their backward per convolution per call (twice under checkpointing):
in a PixelCNN++ about a tenth of a training step's operations. `normalized_weights` computes the
weights of all convolutions whose shapes agree but for the output channels as one concatenated
tensor, and the model hands them to its layers; each value is the same product and quotient of the
same per-channel norm, and gradients reach every g and v through the concatenation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dist_vae.models.fused_ops import concat

Weights = Mapping[nn.Module, torch.Tensor]  # a conv -> its weight for this forward


class WNConv2d(nn.Module):
    """Weight-normalised (transposed) convolution: weight = g * v / ||v|| per output channel.

    Written out rather than through torch's parametrisations so that the state dict is two plain
    tensors, and the weight is recomputed inside a checkpointed block like any other activation.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: tuple[int, int],
        stride: int = 1,
        transpose: bool = False,
    ) -> None:
        super().__init__()
        self.stride, self.transpose = stride, transpose
        shape = (in_ch, out_ch, *kernel) if transpose else (out_ch, in_ch, *kernel)
        self.v = nn.Parameter(torch.empty(shape))
        nn.init.kaiming_uniform_(self.v, a=math.sqrt(5))
        self.norm_dims = (0, 2, 3) if transpose else (1, 2, 3)
        self.g = nn.Parameter(torch.linalg.vector_norm(self.v.detach(), dim=self.norm_dims, keepdim=True))
        self.bias = nn.Parameter(torch.zeros(out_ch))

    @property
    def out_dim(self) -> int:
        """The dimension of v (and g) that indexes output channels."""
        return 1 if self.transpose else 0

    def weight(self) -> torch.Tensor:
        return self.g * self.v / torch.linalg.vector_norm(self.v, dim=self.norm_dims, keepdim=True)

    def frozen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias as constants, computed once for many inference steps. Under autocast the
        weight is cast here once: autocast caches casts of leaf parameters only, so it would cast this
        detached weight again at every step (a kernel per layer per pixel on a GPU). The bias stays:
        some steps add it outside autocast's operations, where its dtype decides the sum's."""
        weight = self.weight().detach()
        device = weight.device.type
        if torch.is_autocast_enabled(device):
            weight = weight.to(torch.get_autocast_dtype(device))
        return weight, self.bias.detach()

    def forward(
        self, x: torch.Tensor, weights: Weights | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The convolution with this forward's weight from `weights` (computed here when None), and
        `bias` in place of its own when given."""
        weight = self.weight() if weights is None else weights[self]
        bias = self.bias if bias is None else bias
        if self.transpose:
            return F.conv_transpose2d(x, weight, bias, stride=self.stride, output_padding=1)
        return F.conv2d(x, weight, bias, stride=self.stride)


def nin(in_ch: int, out_ch: int) -> WNConv2d:
    """Network-in-network: a weight-normed 1x1 convolution (a per-pixel linear map)."""
    return WNConv2d(in_ch, out_ch, (1, 1))


class _NormalizedWeight(torch.autograd.Function):
    """g * v / ||v|| with its backward written out: ten operations where autograd's backward of the
    norm, the product and the quotient takes about twenty (the same derivative: for s = sum(grad * v)
    over a channel, grad_g = s / ||v|| and grad_v = g / ||v|| * (grad - v * s / ||v||^2))."""

    @staticmethod
    def forward(ctx, dims: tuple[int, ...], v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
        ctx.dims = dims
        ctx.save_for_backward(v, g, norm)
        return g * v / norm

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        v, g, norm = ctx.saved_tensors
        s = (grad * v).sum(dim=ctx.dims, keepdim=True)
        return None, g / norm * (grad - v * (s / (norm * norm))), s / norm


def normalized_weights(convs: Iterable[WNConv2d]) -> dict[nn.Module, torch.Tensor]:
    """Every conv's weight, those of one shape (output channels aside) normalised as one tensor."""
    groups: dict[tuple, list[WNConv2d]] = {}
    for conv in convs:
        shape = list(conv.v.shape)
        del shape[conv.out_dim]
        groups.setdefault((conv.transpose, *shape), []).append(conv)
    weights: dict[nn.Module, torch.Tensor] = {}
    for group in groups.values():
        dim, first = group[0].out_dim, group[0]
        v, g = concat((conv.v for conv in group), dim), concat((conv.g for conv in group), dim)
        w = _NormalizedWeight.apply(first.norm_dims, v, g)
        weights.update(zip(group, w.split([conv.v.shape[dim] for conv in group], dim), strict=True))
    return weights
