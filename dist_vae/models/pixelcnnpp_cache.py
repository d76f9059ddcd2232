"""Cached PixelCNN++ generation: each position of each layer computed once, as soon as it can be.

Naive generation runs the whole network once per pixel. Here every layer of `PixelCNNpp.schedule`
keeps its output map, and each position is computed exactly once, as soon as every pixel it depends
on is known:

- the "u" stream sees only rows above, so at the start of image row i each u layer computes its row
  i >> s in one go (s = the layer's scale; only when i is a multiple of 2**s);
- the "ul" stream also sees pixels to the left, so at pixel (i, j) each ul layer computes the single
  position (i >> s, j >> s) (only when i and j are multiples of 2**s).

One pixel then costs a few 2x2 convolutions per block instead of a full forward pass. The wiring is the
schedule's and the arithmetic the layers' own (their `frozen` forms: same weights, same ops on the
windows the full convolution would read), so for the same generator the samples equal naive
generation's up to floating-point summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_vae.models import logistic_mixture
from dist_vae.models.layers import FrozenConv, concat_elu
from dist_vae.models.pixelcnnpp import IMAGE, Layer, PixelCNNpp


class _Map:
    """One layer's output map, zero-padded by one row on top and one column on each side.

    The padding is the causal convolutions' zero padding, so a window read is a plain slice.
    """

    def __init__(self, batch: int, channels: int, side: int, like: torch.Tensor) -> None:
        self.t = like.new_zeros(batch, channels, side + 1, side + 2)

    @property
    def side(self) -> int:
        return self.t.shape[2] - 1

    def window(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        """Rows r0..r1 and columns c0..c1 (inclusive, image coordinates; -1 and side read the padding)."""
        return self.t[:, :, r0 + 1 : r1 + 2, c0 + 1 : c1 + 2]

    def write(self, r: int, c0: int, value: torch.Tensor) -> None:
        self.t[:, :, r + 1, c0 + 1 : c0 + 1 + value.shape[-1]] = value[:, :, 0]


def _conv(conv: FrozenConv, source: _Map, r: int, c0: int, c1: int, act: bool = False) -> torch.Tensor:
    window = source.window(*conv.window(r, c0, c1))
    return conv(concat_elu(window) if act else window)


class _Node:
    """A schedule layer with its output map; `run(r, c0, c1)` fills positions (r, c0..c1)."""

    def __init__(self, layer: Layer, source: _Map, skips: list[_Map], z: torch.Tensor | None) -> None:
        self.layer, self.source, self.skips = layer, source, skips
        modules = layer.modules
        channels, side = source.t.shape[1], source.side
        if layer.kind in ("init_u", "init_ul", "down"):
            self.convs = [m.frozen() for m in modules]
            channels = self.convs[0].weight.shape[0]
            side = side if layer.kind != "down" else side // 2
        elif layer.kind == "block":
            self.block = modules[0].frozen(z)
            self.hidden = _Map(source.t.shape[0], channels, side, source.t)
        else:
            self.deconv = modules[0].frozen()
            channels, side = self.deconv.weight.shape[1], 2 * side
        self.out = _Map(source.t.shape[0], channels, side, source.t)

    def run(self, r: int, c0: int, c1: int) -> None:
        kind = self.layer.kind
        if kind == "init_u":
            if r > 0:  # down_shift: row r holds the convolution's row r - 1
                self.out.write(r, c0, _conv(self.convs[0], self.source, r - 1, c0, c1))
        elif kind == "init_ul":
            # down_shift(up(x)) + right_shift(left(x)); either shifted-in border is zero.
            up, left = self.convs
            value = torch.zeros_like(self.out.window(r, r, c0, c1))
            if r > 0:
                value = value + _conv(up, self.source, r - 1, c0, c1)
            if c0 > 0:
                value = value + _conv(left, self.source, r, c0 - 1, c1 - 1)
            self.out.write(r, c0, value)
        elif kind == "down":
            self.out.write(r, c0, _conv(self.convs[0], self.source, r, c0, c1))
        elif kind == "block":
            skips = tuple(s.window(r, r, c0, c1) for s in self.skips)
            self.hidden.write(
                r, c0, self.block.hidden(_conv(self.block.conv_in, self.source, r, c0, c1, True), skips)
            )
            conv_out = _conv(self.block.conv_out, self.hidden, r, c0, c1, True)
            self.out.write(r, c0, self.block.output(self.source.window(r, r, c0, c1), conv_out))
        elif self.layer.stream == "u":  # "up", a whole row
            source = self.source.window(r // 2, r // 2, 0, self.source.side - 1)
            self.out.write(r, c0, self.deconv.row(source, r)[..., c0 : c1 + 1])
        else:  # "up", one position
            source = self.source.window(r // 2, r // 2, c0 // 2, c0 // 2)[:, :, 0, 0]
            self.out.write(r, c0, self.deconv.position(source, r, c0))


@torch.no_grad()
def cached_decode(
    net: PixelCNNpp, z: torch.Tensor | None, side: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """x ~ p(x | z) [n, 3, side, side] in [-1, 1], drawn pixel by pixel exactly as naive decoding
    draws them (same generator calls in the same order). The caller puts `net` in eval mode."""
    n = z.shape[0] if z is not None else 1
    like = next(net.parameters())
    z = None if z is None else z.to(like.dtype)
    x = _Map(n, 4, side, like)
    x.t[:, 3, 1:, 1:-1] = 1.0  # the constant channel that marks the image border
    nodes: list[_Node] = []
    for layer in net.schedule:
        source = x if layer.source == IMAGE else nodes[layer.source].out
        nodes.append(_Node(layer, source, [nodes[s].out for s in layer.skips], z))
    rows = [node for node in nodes if node.layer.stream == "u"]
    positions = [node for node in nodes if node.layer.stream == "ul"]
    last = nodes[-1].out
    out = net.out.frozen()
    for i in range(side):
        for node in rows:
            scale = node.layer.scale
            if i % (1 << scale) == 0:
                node.run(i >> scale, 0, (side >> scale) - 1)
        for j in range(side):
            for node in positions:
                scale = node.layer.scale
                if i % (1 << scale) == 0 and j % (1 << scale) == 0:
                    node.run(i >> scale, j >> scale, j >> scale)
            params = F.conv2d(F.elu(last.window(i, i, j, j)), *out)
            pixel = logistic_mixture.sample(params, generator)
            x.write(i, j, torch.cat([pixel.to(x.t.dtype), x.window(i, i, j, j)[:, 3:]], dim=1))
    return x.window(0, side - 1, 0, side - 1)[:, :3].clone()
