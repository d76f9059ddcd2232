"""The gated resnet's elementwise work in few tensors and operations: its activation, dropout and
padding as one tensor instead of five, and its gated residual sum; and a concatenation of many
parameters whose backward is one split.

Written as `pad(dropout(elu(cat([*xs, *-xs]))))`, the block's input to each shifted convolution costs a
negation, a concatenation, an ELU, a dropout product and quotient and a zero-padded copy: six
tensors of up to twice the block's channels, each written once and read again by the next step.
`padded_concat_elu` writes the same values once, into the padded buffer the convolution reads, and its
backward applies the same formulas in the same order (the ELU's derivative from its input, the
dropout's division before its mask). Values may differ in their last bits: torch's vectorised and
scalar exp part ways by an ulp and which elements take which path depends on strides, and the two
halves' derivatives are summed before the residual's rather than after (1e-15 relative in float64
over a whole model). Training runs that amplify such bits diverge as they would on another machine.
What it removes (allocations, bytes moved, kernel launches) does not depend on the device: on a GPU
each avoided tensor is an avoided kernel launch and a round trip through memory.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.nn.functional as F

Padding = tuple[int, int, int, int]  # (left, right, top, bottom), as F.pad takes it


def _interior(buffer: torch.Tensor, padding: Padding) -> torch.Tensor:
    left, right, top, bottom = padding
    return buffer[:, :, top : buffer.shape[2] - bottom, left : buffer.shape[3] - right]


def _elu_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d elu(x) / dx times grad, from the input (as autograd's ELU backward computes it)."""
    return torch.ops.aten.elu_backward(grad, 1.0, 1, 1, False, x)


class _PaddedConcatElu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, padding: Padding, keep: torch.Tensor | None, dropout: float, *xs: torch.Tensor):
        b, _, h, w = xs[0].shape
        dtype = functools.reduce(torch.promote_types, (x.dtype for x in xs))  # as torch.cat promotes
        channels = sum(x.shape[1] for x in xs)
        left, right, top, bottom = padding
        buffer = xs[0].new_zeros(b, 2 * channels, h + top + bottom, w + left + right, dtype=dtype)
        inner = _interior(buffer, padding)
        start = 0
        for x in xs:
            inner[:, start : start + x.shape[1]].copy_(x)
            inner[:, channels + start : channels + start + x.shape[1]].copy_(x).neg_()  # no out=: dynamo
            start += x.shape[1]
        F.elu(inner, inplace=True)
        if keep is not None:
            inner.mul_(keep).div_(1.0 - dropout)
        ctx.padding, ctx.dropout = padding, dropout
        ctx.save_for_backward(keep, *xs)
        return buffer

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        keep, *xs = ctx.saved_tensors
        grad = _interior(grad, ctx.padding)
        if keep is not None:
            grad = grad.div(1.0 - ctx.dropout).mul(keep)
        channels = grad.shape[1] // 2
        grads, start = [], 0
        for x in xs:
            n = x.shape[1]
            positive = _elu_grad(grad[:, start : start + n], x)
            negative = _elu_grad(grad[:, channels + start : channels + start + n], -x)
            grads.append(positive - negative)
            start += n
        return None, None, None, *grads


def padded_concat_elu(
    xs: tuple[torch.Tensor, ...],
    padding: Padding = (0, 0, 0, 0),
    keep: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """F.pad(elu(cat([*xs, *(-x for x in xs)], 1)) * keep / (1 - dropout), padding) in one buffer.

    `keep` is the dropout mask over the unpadded output (None: no dropout)."""
    return _PaddedConcatElu.apply(padding, keep, dropout, *xs)


class _GatedResidual(torch.autograd.Function):
    """x + a * sigmoid(b) for [a, b] = h + cond, with the backward autograd would run for those ops
    (the same formulas in the same order) in a third of its operations: no split of h, no gradient
    of each elementwise op materialised apart."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, h: torch.Tensor, cond: torch.Tensor | None):
        if cond is not None:
            h = h + cond
        half = h.shape[1] // 2
        a, gate = h[:, :half], torch.sigmoid(h[:, half:])
        ctx.save_for_backward(a, gate)
        ctx.has_cond = cond is not None
        return x + a * gate

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, gate = ctx.saved_tensors
        grad_b = torch.ops.aten.sigmoid_backward(grad * a, gate)
        grad_h = torch.cat([grad * gate, grad_b], dim=1)
        grad_cond = grad_h.sum(dim=(2, 3), keepdim=True) if ctx.has_cond else None
        return grad, grad_h, grad_cond


def gated_residual(x: torch.Tensor, h: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    """x + a * sigmoid(b) for [a, b] = h + cond along channels (cond [B, C, 1, 1] or None)."""
    return _GatedResidual.apply(x, h, cond)


class _Concat(torch.autograd.Function):
    """torch.cat whose backward hands the inputs their gradients by one split (one view each) rather
    than a narrow per input (three operations each): the same values, a third of the operations."""

    @staticmethod
    def forward(ctx, dim: int, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.dim, ctx.sizes = dim, [t.shape[dim] for t in tensors]
        return torch.cat(tensors, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, *grad.split(ctx.sizes, ctx.dim)


def concat(tensors: Iterable[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """torch.cat(tensors, dim), for many parameters concatenated once per forward (see `_Concat`)."""
    return _Concat.apply(dim, *tensors)
