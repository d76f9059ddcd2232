"""Samplers: cached PixelCNN++ generation, PixelVAE Markov chains and prior samples, iterative canvases.

Naive PixelCNN++ generation (`PixelVAE.decode`) runs the whole network once per pixel. Here every
layer's activations are cached, and each position of each layer is computed exactly once, as soon
as every pixel it depends on is known:

- the "u" stream sees only rows above, so at the start of image row i each u layer computes its row
  i >> s in one go (s = its stage's halving count; only when i is a multiple of 2**s);
- the "ul" stream also sees pixels to the left, so at pixel (i, j) each ul layer computes the single
  position (i >> s, j >> s) (only when i and j are multiples of 2**s).

One pixel then costs a few 2x2 convolutions per block instead of a full forward pass. The arithmetic
is the network's own (same weights, same ops on the windows the full convolution would read), so for
the same generator the samples equal naive generation's up to floating-point summation order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dist_vae.models import logistic_mixture
from dist_vae.models.iterative_vae import IterativeVAE
from dist_vae.models.layers import GatedResnet, WNConv2d, concat_elu
from dist_vae.models.pixel_vae import PixelVAE
from dist_vae.models.pixelcnnpp import PixelCNNpp

__all__ = [
    "ancestral_samples",
    "cached_decode",
    "grid_samples",
    "iterative_canvases",
    "markov_chain",
]


class _Cache:
    """One layer's output map, zero-padded by one row on top and one column on each side.

    The padding is the causal convolutions' zero padding, so a window read is a plain slice.
    """

    def __init__(self, batch: int, channels: int, side: int, like: torch.Tensor) -> None:
        self.t = like.new_zeros(batch, channels, side + 1, side + 2)

    def window(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        """Rows r0..r1 and columns c0..c1 (inclusive, image coordinates; -1 and side read the padding)."""
        return self.t[:, :, r0 + 1 : r1 + 2, c0 + 1 : c1 + 2]

    def write(self, r: int, c0: int, value: torch.Tensor) -> None:
        self.t[:, :, r + 1, c0 + 1 : c0 + 1 + value.shape[-1]] = value[:, :, 0]


class _Conv:
    """A padded (possibly strided) causal convolution evaluated on one output row segment."""

    def __init__(self, module: nn.Module) -> None:
        conv: WNConv2d = module.conv
        self.left, _, self.top, _ = module.pad
        self.kh, self.kw = conv.v.shape[-2:]
        self.stride = conv.stride
        self.weight, self.bias = conv.weight().detach(), conv.bias.detach()
        self.matrix = self.weight.flatten(1).T.contiguous()

    def __call__(self, source: _Cache, r: int, c0: int, c1: int, act: Callable | None = None) -> torch.Tensor:
        s = self.stride
        top, left = s * r - self.top, s * c0 - self.left
        window = source.window(top, top + self.kh - 1, left, s * c1 - self.left + self.kw - 1)
        window = window if act is None else act(window)
        if c0 == c1:  # one output position: a matrix product, far cheaper than conv2d's set-up
            return torch.addmm(self.bias, window.reshape(window.shape[0], -1), self.matrix)[:, :, None, None]
        return F.conv2d(window, self.weight, self.bias, stride=s)


class _Node:
    """A layer of the network with its cache; `run(r, c0, c1)` fills positions (r, c0..c1)."""

    stream: str  # "u" (row-wise) or "ul" (position-wise)
    scale: int  # the map is the image halved `scale` times
    out: _Cache

    def run(self, r: int, c0: int, c1: int) -> None:
        raise NotImplementedError


class _InitU(_Node):
    def __init__(self, net: PixelCNNpp, x: _Cache, side: int) -> None:
        self.stream, self.scale, self.x = "u", 0, x
        self.conv = _Conv(net.u_init)
        self.out = _Cache(x.t.shape[0], self.conv.weight.shape[0], side, x.t)

    def run(self, r: int, c0: int, c1: int) -> None:
        if r > 0:  # down_shift: row r holds the convolution's row r - 1
            self.out.write(r, c0, self.conv(self.x, r - 1, c0, c1))


class _InitUL(_Node):
    def __init__(self, net: PixelCNNpp, x: _Cache, side: int) -> None:
        self.stream, self.scale, self.x = "ul", 0, x
        self.up, self.left = _Conv(net.ul_init_up), _Conv(net.ul_init_left)
        self.out = _Cache(x.t.shape[0], self.up.weight.shape[0], side, x.t)

    def run(self, r: int, c0: int, c1: int) -> None:
        # down_shift(up(x)) + right_shift(left(x)); either shifted-in border is zero.
        value = torch.zeros_like(self.out.window(r, r, c0, c1))
        if r > 0:
            value = value + self.up(self.x, r - 1, c0, c1)
        if c0 > 0:
            value = value + self.left(self.x, r, c0 - 1, c1 - 1)
        self.out.write(r, c0, value)


class _Block(_Node):
    """A gated resnet; caches its hidden map too, as its second convolution reads a window of it."""

    def __init__(
        self,
        block: GatedResnet,
        stream: str,
        scale: int,
        x: _Node,
        skips: tuple[_Node, ...],
        z: torch.Tensor | None,
    ) -> None:
        self.stream, self.scale, self.x, self.skips = stream, scale, x, skips
        self.conv_in, self.conv_out = _Conv(block.conv_in), _Conv(block.conv_out)
        # The 1x1 skip convolution as a matrix over channels (cheaper than conv2d on a few positions).
        self.skip = (
            None
            if block.skip is None
            else (block.skip.weight().detach().flatten(1).T, block.skip.bias.detach())
        )
        self.cond = None if block.cond is None else block.cond(z)[:, :, None, None]
        shape = x.out.t.shape
        self.h = _Cache(shape[0], shape[1], shape[2] - 1, x.out.t)
        self.out = _Cache(shape[0], shape[1], shape[2] - 1, x.out.t)

    def run(self, r: int, c0: int, c1: int) -> None:
        h = self.conv_in(self.x.out, r, c0, c1, concat_elu)
        if self.skip is not None:
            skips = torch.cat([s.out.window(r, r, c0, c1) for s in self.skips], dim=1)
            matrix, bias = self.skip
            h = h + (concat_elu(skips).movedim(1, -1) @ matrix + bias).movedim(-1, 1)
        self.h.write(r, c0, h)
        h = self.conv_out(self.h, r, c0, c1, concat_elu)
        if self.cond is not None:
            h = h + self.cond
        a, b = h.chunk(2, dim=1)
        self.out.write(r, c0, self.x.out.window(r, r, c0, c1) + a * torch.sigmoid(b))


class _Down(_Node):
    """Stride-2 causal convolution to the next (coarser) scale."""

    def __init__(self, module: nn.Module, stream: str, x: _Node) -> None:
        self.stream, self.scale, self.x = stream, x.scale + 1, x
        self.conv = _Conv(module)
        shape = x.out.t.shape
        self.out = _Cache(shape[0], self.conv.weight.shape[0], (shape[2] - 1) // 2, x.out.t)

    def run(self, r: int, c0: int, c1: int) -> None:
        self.out.write(r, c0, self.conv(self.x.out, r, c0, c1))


class _Up(_Node):
    """Stride-2 transposed convolution to the next finer scale.

    Output (r, c) receives input row r // 2 only, so a u row runs the module itself on that one input
    row (its cropping then lines up unchanged). A ul output (r, c) receives input (r // 2, c // 2)
    alone, through kernel tap (r % 2, c % 2): a matrix product.
    """

    def __init__(self, module: nn.Module, stream: str, x: _Node) -> None:
        self.stream, self.scale, self.x, self.module = stream, x.scale - 1, x, module
        self.weight, self.bias = module.deconv.weight().detach(), module.deconv.bias.detach()
        shape = x.out.t.shape
        self.out = _Cache(shape[0], shape[1], 2 * (shape[2] - 1), x.out.t)

    def run(self, r: int, c0: int, c1: int) -> None:
        side = self.x.out.t.shape[2] - 1
        if self.stream == "u":
            up = self.module(self.x.out.window(r // 2, r // 2, 0, side - 1))[:, :, r % 2 : r % 2 + 1]
            self.out.write(r, c0, up[..., c0 : c1 + 1])
        else:
            source = self.x.out.window(r // 2, r // 2, c0 // 2, c0 // 2)[:, :, 0, 0]
            up = source @ self.weight[:, :, r % 2, c0 % 2] + self.bias
            self.out.write(r, c0, up[:, :, None, None])


def _graph(net: PixelCNNpp, x: _Cache, side: int, z: torch.Tensor | None) -> list[_Node]:
    """The network's layers in forward order, mirroring `PixelCNNpp.forward` stage by stage."""
    nodes: list[_Node] = []

    def add(node: _Node) -> _Node:
        nodes.append(node)
        return node

    us: list[_Node] = [add(_InitU(net, x, side))]
    uls: list[_Node] = [add(_InitUL(net, x, side))]
    for stage in range(net.n_stages):
        for block_u, block_ul in zip(net.up_u[stage], net.up_ul[stage], strict=True):
            us.append(add(_Block(block_u, "u", stage, us[-1], (), z)))
            uls.append(add(_Block(block_ul, "ul", stage, uls[-1], (us[-1],), z)))
        if stage < net.n_stages - 1:
            us.append(add(_Down(net.down_sample_u[stage], "u", us[-1])))
            uls.append(add(_Down(net.down_sample_ul[stage], "ul", uls[-1])))
    u, ul = us.pop(), uls.pop()
    for stage in range(net.n_stages):
        scale = net.n_stages - 1 - stage
        for block_u, block_ul in zip(net.down_u[stage], net.down_ul[stage], strict=True):
            u = add(_Block(block_u, "u", scale, u, (us.pop(),), z))
            ul = add(_Block(block_ul, "ul", scale, ul, (u, uls.pop()), z))
        if stage < net.n_stages - 1:
            u = add(_Up(net.up_sample_u[stage], "u", u))
            ul = add(_Up(net.up_sample_ul[stage], "ul", ul))
    return nodes


@torch.no_grad()
def cached_decode(model: PixelVAE, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x ~ p(x | z) [n, 3, R, R] in [-1, 1], drawing exactly as `model.decode` does, pixel by pixel.

    The model is put in eval mode for the duration (dropout off), as naive decoding does.
    """
    net = model.decoder
    was_training = model.training
    model.eval()
    try:
        n, side = z.shape[0], model.resolution
        z = z.to(next(net.parameters()).dtype)
        x = _Cache(n, 4, side, z[:, :, None, None])
        x.t[:, 3, 1:, 1:-1] = 1.0  # the constant channel that marks the image border
        nodes = _graph(net, x, side, z)
        rows = [node for node in nodes if node.stream == "u"]
        positions = [node for node in nodes if node.stream == "ul"]
        last = positions[-1]
        out_weight, out_bias = net.out.weight().detach(), net.out.bias.detach()
        for i in range(side):
            for node in rows:
                if i % (1 << node.scale) == 0:
                    node.run(i >> node.scale, 0, (side >> node.scale) - 1)
            for j in range(side):
                for node in positions:
                    step = 1 << node.scale
                    if i % step == 0 and j % step == 0:
                        node.run(i >> node.scale, j >> node.scale, j >> node.scale)
                params = F.conv2d(F.elu(last.out.window(i, i, j, j)), out_weight, out_bias)
                pixel = logistic_mixture.sample(params, generator)
                x.write(i, j, torch.cat([pixel.to(x.t.dtype), x.window(i, i, j, j)[:, 3:]], dim=1))
        return x.window(0, side - 1, 0, side - 1)[:, :3].clone()
    finally:
        model.train(was_training)


def _prior(model: PixelVAE, n: int, generator: torch.Generator | None) -> torch.Tensor:
    param = next(model.parameters())
    noise_device = generator.device if generator is not None else param.device
    return torch.randn(n, model.latent_dim, generator=generator, device=noise_device).to(param)


@torch.no_grad()
def ancestral_samples(
    model: PixelVAE, n: int, generator: torch.Generator | None = None, cached: bool = True
) -> torch.Tensor:
    """z ~ p(z) = N(0, I), then x ~ p(x | z): [n, 3, R, R] in [-1, 1]."""
    z = _prior(model, n, generator)
    return cached_decode(model, z, generator) if cached else model.decode(z, generator)


@torch.no_grad()
def markov_chain(
    model: PixelVAE,
    start: torch.Tensor,
    steps: int,
    generator: torch.Generator | None = None,
    cached: bool = True,
) -> list[torch.Tensor]:
    """x_0 = start, then K times z ~ q(z | x_k), x_{k+1} ~ p(x | z); returns [x_0, ..., x_K].

    `start` is data or noise in [-1, 1] (the range the model was trained on; the seed's chain started
    from U(0, 1), off that range). The encoder runs in eval mode, like the decoder.
    """
    if start.dim() != 4 or start.shape[1:] != (3, model.resolution, model.resolution):
        raise ValueError(
            f"chain start must be [n, 3, {model.resolution}, {model.resolution}], got {tuple(start.shape)}"
        )
    if start.min() < -1.0 or start.max() > 1.0:
        raise ValueError(f"chain start must lie in [-1, 1], got [{start.min():.3f}, {start.max():.3f}]")
    was_training = model.training
    model.eval()
    try:
        chain = [start.to(next(model.parameters()))]
        for _ in range(steps):
            mean, logvar = model.encode(chain[-1])
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = (mean + torch.exp(0.5 * logvar) * noise).to(chain[0])
            chain.append(cached_decode(model, z, generator) if cached else model.decode(z, generator))
        return chain
    finally:
        model.train(was_training)


@torch.no_grad()
def iterative_canvases(
    model: IterativeVAE, n: int, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """The iterative VAE's T canvases from the prior, each [n, 3, R, R], in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return model.sample(n, generator)
    finally:
        model.train(was_training)


@torch.no_grad()
def grid_samples(
    model: nn.Module, n: int, generator: torch.Generator | None = None
) -> torch.Tensor | list[torch.Tensor]:
    """What a run's sample grid shows: cached ancestral samples of a PixelVAE (naive generation would
    cost one full forward pass per pixel), the per-step canvases of the iterative VAE."""
    if isinstance(model, PixelVAE):
        was_training = model.training
        model.eval()
        try:
            return ancestral_samples(model, n, generator)
        finally:
            model.train(was_training)
    if isinstance(model, IterativeVAE):
        return iterative_canvases(model, n, generator)
    raise TypeError(f"no sampler for {type(model).__name__}")
