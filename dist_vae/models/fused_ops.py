"""The gated resnet's elementwise work in few tensors and operations: its activation, dropout and
padding as one tensor instead of five, its skip inputs' 1x1 convolution added in one matrix product,
and its gated residual sum; and a concatenation of many parameters whose backward is one split.

Written as `pad(dropout(elu(cat([*xs, *-xs]))))`, the block's input to each shifted convolution costs a
negation, a concatenation, an ELU, a dropout product and quotient and a zero-padded copy: six
tensors of up to twice the block's channels, each written once and read again by the next step.
`padded_concat_elu` writes the same values once, into the padded buffer the convolution reads (the
dropout's 1 / (1 - p) as the ELU's output scale, its mask as a fill), and its backward takes the ELU's
derivative from that buffer, as autograd does for an in-place ELU. Values may differ in their last
bits (summation order, the ELU's vectorised and scalar exp, the derivative from the output: 1e-15
relative in float64 over a whole model); training runs that amplify such bits diverge as they would
on another machine. Views are taken with one `as_strided` each: indexing dispatches a slice per
dimension. What this removes (allocations, bytes moved, operations) does not depend on the device:
on a GPU each avoided tensor is an avoided kernel launch and a round trip through memory. Under
torch.compile each function is its plain formulation instead: inductor fuses that and derives its
backward itself, where this module's writes into windows of a buffer would be traced as a copy of the
whole buffer each.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.nn.functional as F

Padding = tuple[int, int, int, int]  # (left, right, top, bottom), as F.pad takes it
NO_PADDING: Padding = (0, 0, 0, 0)


def _window(
    t: torch.Tensor, start: int, channels: int, top: int = 0, left: int = 0, size=None
) -> torch.Tensor:
    """t[:, start : start + channels, top : top + h, left : left + w] for size (h, w) (default: t's)."""
    h, w = size if size is not None else t.shape[2:]
    stride = t.stride()
    offset = t.storage_offset() + start * stride[1] + top * stride[2] + left * stride[3]
    return t.as_strided((t.shape[0], channels, h, w), stride, offset)


def _concat_elu(
    xs: tuple[torch.Tensor, ...], padding: Padding, drop: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """The padded buffer of scale * elu([*xs, *-xs]), zero where `drop`."""
    b, _, h, w = xs[0].shape
    dtype = functools.reduce(torch.promote_types, (x.dtype for x in xs))  # as torch.cat promotes
    channels = sum(x.shape[1] for x in xs)
    left, right, top, bottom = padding
    shape = (b, 2 * channels, h + top + bottom, w + left + right)
    # Zeros only where there is padding: every other value is written below. (torch.full: one
    # operation fewer than torch.zeros.)
    if any(padding):
        buffer = torch.full(shape, 0.0, dtype=dtype, device=xs[0].device)
    else:
        buffer = torch.empty(shape, dtype=dtype, device=xs[0].device)
    start = 0
    for x in xs:
        n = x.shape[1]
        _window(buffer, start, n, top, left, (h, w)).copy_(x)
        _window(buffer, channels + start, n, top, left, (h, w)).copy_(x).neg_()  # no out=: dynamo
        start += n
    inner = _window(buffer, 0, 2 * channels, top, left, (h, w)) if any(padding) else buffer
    torch.ops.aten.elu_(inner, 1.0, scale, 1.0)
    if drop is not None:
        inner.masked_fill_(drop, 0.0)
    return buffer


def _concat_elu_grads(
    grad: torch.Tensor,
    buffer: torch.Tensor,
    padding: Padding,
    drop: torch.Tensor | None,
    scale: float,
    sizes: list[int],
    overwrite: bool = False,
) -> list[torch.Tensor]:
    """The gradients of `_concat_elu`'s inputs from its output's `grad` and the output itself;
    `overwrite`: `grad` is this backward's own, and the ELU's derivative is applied in it (one
    tensor of the buffer's size fewer at the peak)."""
    left, right, top, bottom = padding
    channels = buffer.shape[1] // 2
    if any(padding):
        size = (buffer.shape[2] - top - bottom, buffer.shape[3] - left - right)
        grad = _window(grad, 0, 2 * channels, top, left, size)
        buffer = _window(buffer, 0, 2 * channels, top, left, size)
    # The ELU's derivative from its output: where dropped that is 0, and the gradient is masked after.
    if overwrite:
        torch.ops.aten.elu_backward.grad_input(grad, 1.0, scale, 1.0, True, buffer, grad_input=grad)
    else:
        grad = torch.ops.aten.elu_backward(grad, 1.0, scale, 1.0, True, buffer)
    if drop is not None:
        grad.masked_fill_(drop, 0.0)
    grads, start = [], 0
    for n in sizes:
        grads.append(_window(grad, start, n) - _window(grad, channels + start, n))
        start += n
    return grads


def _plain_concat_elu(
    xs: tuple[torch.Tensor, ...], padding: Padding, drop: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """`_concat_elu` as separate operations, for torch.compile: inductor fuses them into one kernel
    itself, while the buffer writes of the eager version become a copy of the buffer each
    (slice_scatter) in a traced graph, and its views (storage_offset) break the graph."""
    y = F.elu(torch.cat([*xs, *(-x for x in xs)], 1)) * scale
    return F.pad(y if drop is None else y.masked_fill(drop, 0.0), padding)


class _PaddedConcatElu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, padding: Padding, drop: torch.Tensor | None, scale: float, *xs: torch.Tensor):
        ctx.padding, ctx.sizes, ctx.scale = padding, [x.shape[1] for x in xs], scale
        buffer = _concat_elu(xs, padding, drop, scale)
        ctx.save_for_backward(buffer, drop)
        return buffer

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        buffer, drop = ctx.saved_tensors
        return None, None, None, *_concat_elu_grads(grad, buffer, ctx.padding, drop, ctx.scale, ctx.sizes)


def padded_concat_elu(
    xs: tuple[torch.Tensor, ...],
    padding: Padding = NO_PADDING,
    drop: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """F.pad(elu(cat([*xs, *(-x for x in xs)], 1)) * ~drop / (1 - dropout), padding) in one buffer.

    `drop` is the dropout mask over the unpadded output, True where dropped (None: no dropout)."""
    scale = 1.0 / (1.0 - dropout) if drop is not None else 1.0
    if torch.compiler.is_compiling():
        return _plain_concat_elu(xs, padding, drop, scale)
    return _PaddedConcatElu.apply(padding, drop, scale, *xs)


class _SkipSum(torch.autograd.Function):
    """h + W concat_elu(skips) per pixel: a 1x1 convolution without bias as one batched matrix
    product that adds into h, with its backward written out (two more products). The weight [C, K,
    1, 1] is read as the matrix [C, K] and its transpose by one view each, repeated over the batch."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, *skips: torch.Tensor):
        buffer = _concat_elu(skips, NO_PADDING, None, 1.0)
        (b, c, rows, cols), k = h.shape, buffer.shape[1]
        w = weight.as_strided((b, c, k), (0, *weight.stride()[:2]))
        out = torch.baddbmm(h.view(b, c, rows * cols), w, buffer.view(b, k, rows * cols))
        ctx.sizes = [x.shape[1] for x in skips]
        ctx.save_for_backward(weight, buffer)
        return out.view(b, c, rows, cols)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, buffer = ctx.saved_tensors
        (b, c, rows, cols), k = grad.shape, buffer.shape[1]
        flat = grad.contiguous().view(b, c, rows * cols)
        # Under autocast the forward's products ran in the gradient's dtype, not in the saved tensors'.
        weight = weight.to(grad.dtype)
        w_t = weight.as_strided((b, k, c), (0, *reversed(weight.stride()[:2])))
        grad_inputs = torch.bmm(w_t, flat).view(buffer.shape)
        inputs = buffer.to(grad.dtype)
        inputs_t = inputs.as_strided((b, rows * cols, k), (inputs.stride(0), 1, inputs.stride(1)))
        grad_weight = torch.bmm(flat, inputs_t)  # [b, c, k]
        grad_weight = (grad_weight if b == 1 else grad_weight.sum(0)).view(weight.shape)
        grads = _concat_elu_grads(grad_inputs, buffer, NO_PADDING, None, 1.0, ctx.sizes, overwrite=True)
        return grad, grad_weight, *grads


def skip_sum(h: torch.Tensor, weight: torch.Tensor, skips: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """h + conv2d(concat_elu(cat(skips, 1)), weight) for a 1x1 `weight` [C, 2 * skip channels, 1, 1]:
    the convolution's bias belongs in h."""
    if torch.compiler.is_compiling():
        return h + F.conv2d(_plain_concat_elu(skips, NO_PADDING, None, 1.0), weight)
    return _SkipSum.apply(h, weight, *skips)


class _GatedResidual(torch.autograd.Function):
    """x + a * sigmoid(b) for [a, b] = h + cond, with the backward autograd would run for those ops
    (the same formulas in the same order) in a third of its operations: no split of h, no gradient
    of each elementwise op materialised apart."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, h: torch.Tensor, cond: torch.Tensor | None):
        if cond is not None:
            h = h + cond
        half = h.shape[1] // 2
        a, gate = _window(h, 0, half), torch.sigmoid(_window(h, half, half))
        ctx.save_for_backward(a, gate)
        ctx.has_cond = cond is not None
        return torch.addcmul(x, a, gate)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, gate = ctx.saved_tensors
        grad_b = torch.ops.aten.sigmoid_backward(grad * a, gate)
        grad_h = torch.cat([grad * gate, grad_b], dim=1)
        grad_cond = grad_h.sum(dim=(2, 3), keepdim=True) if ctx.has_cond else None
        return grad, grad_h, grad_cond


def gated_residual(x: torch.Tensor, h: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    """x + a * sigmoid(b) for [a, b] = h + cond along channels (cond [B, C, 1, 1] or None)."""
    if torch.compiler.is_compiling():  # inductor fuses the plain expression and derives its backward
        a, b = (h if cond is None else h + cond).chunk(2, 1)
        return torch.addcmul(x, a, torch.sigmoid(b))
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
    if torch.compiler.is_compiling():
        return torch.cat(list(tensors), dim)
    return _Concat.apply(dim, *tensors)
