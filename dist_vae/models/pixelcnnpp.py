"""Conditional PixelCNN++ (Salimans et al. 2017): two causal streams in a U-net of gated resnets.

The "u" stream sees only rows above a pixel, the "ul" stream rows above plus the pixels to its
left; together they cover the whole causal context without a blind spot. Each of `n_stages` stages
runs `nr_resnet` gated blocks per stream at one resolution; the down pass mirrors the up pass and
takes every up-pass output as a skip input. A latent z (cond_dim) biases every gated block.

The wiring is written once, as `PixelCNNpp.schedule`: a list of layers in forward order, each naming
its input and skip inputs. `forward` runs it on whole images; the cached sampler
(`pixelcnnpp_cache.py`) runs the same list position by position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dist_vae.models.layers import (
    DownRightShiftedConv2d,
    DownRightShiftedDeconv2d,
    DownShiftedConv2d,
    DownShiftedDeconv2d,
    GatedResnet,
    down_shift,
    nin,
    right_shift,
)
from dist_vae.models.logistic_mixture import num_params
from dist_vae.models.weight_norm import Weights, WNConv2d, concat, normalized_weights

IMAGE = -1  # `Layer.source` of the layers that read the input image


@dataclass(frozen=True)
class Layer:
    """One step of the network: `modules` applied to the output of layer `source` (IMAGE: the input)
    with the outputs of layers `skips` as skip inputs, producing a map of the "u" (rows above) or "ul"
    (rows above and pixels to the left) stream at `scale` (the image halved that many times).

    kind: "init_u" down_shift(conv(x)); "init_ul" down_shift(conv_up(x)) + right_shift(conv_left(x));
    "block" a gated resnet; "down" a stride-2 convolution; "up" a stride-2 transposed convolution.
    """

    kind: str
    stream: str
    scale: int
    modules: tuple[nn.Module, ...]
    source: int
    skips: tuple[int, ...] = ()


class PixelCNNpp(nn.Module):
    """forward(x [B,3,H,W] in [-1,1], z [B,cond_dim]) -> mixture parameters [B, 10*nr_mix, H, W].

    The parameters at pixel (i, j) depend only on pixels before (i, j) in raster order; H and W must
    be divisible by 2**(n_stages-1).
    """

    def __init__(
        self,
        nr_resnet: int = 5,
        nr_filters: int = 160,
        nr_mix: int = 10,
        n_stages: int = 3,
        cond_dim: int | None = None,
        dropout: float = 0.5,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.n_stages, self.cond_dim, self.dropout = n_stages, cond_dim, dropout
        f = nr_filters

        def block(conv: type[nn.Module], n_skip: int) -> GatedResnet:
            return GatedResnet(f, conv, n_skip, cond_dim, dropout, gradient_checkpointing)

        # +1 input channel of ones: zero padding then tells the network where the image border is.
        self.u_init = DownShiftedConv2d(3 + 1, f, (2, 3))
        self.ul_init_up = DownShiftedConv2d(3 + 1, f, (1, 3))
        self.ul_init_left = DownRightShiftedConv2d(3 + 1, f, (2, 1))
        self.up_u = nn.ModuleList()
        self.up_ul = nn.ModuleList()
        for _ in range(n_stages):
            self.up_u.append(nn.ModuleList(block(DownShiftedConv2d, 0) for _ in range(nr_resnet)))
            self.up_ul.append(nn.ModuleList(block(DownRightShiftedConv2d, 1) for _ in range(nr_resnet)))
        self.down_sample_u = nn.ModuleList(DownShiftedConv2d(f, f, stride=2) for _ in range(n_stages - 1))
        self.down_sample_ul = nn.ModuleList(
            DownRightShiftedConv2d(f, f, stride=2) for _ in range(n_stages - 1)
        )
        # The down pass consumes every up-pass output: nr_resnet blocks in the first (lowest
        # resolution) stage, nr_resnet + 1 after each upsampling to also take the downsampled map.
        self.down_u = nn.ModuleList()
        self.down_ul = nn.ModuleList()
        for stage in range(n_stages):
            n = nr_resnet if stage == 0 else nr_resnet + 1
            self.down_u.append(nn.ModuleList(block(DownShiftedConv2d, 1) for _ in range(n)))
            self.down_ul.append(nn.ModuleList(block(DownRightShiftedConv2d, 2) for _ in range(n)))
        self.up_sample_u = nn.ModuleList(DownShiftedDeconv2d(f, f) for _ in range(n_stages - 1))
        self.up_sample_ul = nn.ModuleList(DownRightShiftedDeconv2d(f, f) for _ in range(n_stages - 1))
        self.out = nin(f, num_params(nr_mix))
        self.schedule = self._build_schedule()
        self._released = _last_reads(self.schedule)

    def _check(self, x: torch.Tensor, z: torch.Tensor | None) -> None:
        factor = 2 ** (self.n_stages - 1)
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"PixelCNNpp input must be [B, 3, H, W] with H, W divisible by 2**(n_stages-1) = {factor}, "
                f"got {tuple(x.shape)}"
            )
        if self.cond_dim is None and z is not None:
            raise ValueError("this PixelCNNpp has cond_dim=None but was given z")
        if self.cond_dim is not None and (z is None or z.shape != (x.shape[0], self.cond_dim)):
            got = None if z is None else tuple(z.shape)
            raise ValueError(f"z must be [B, cond_dim] = [{x.shape[0]}, {self.cond_dim}], got {got}")

    def _conds(self, z: torch.Tensor | None) -> dict[nn.Module, torch.Tensor]:
        """Every gated block's latent bias [B, 2F, 1, 1], from one matrix product over all of theirs."""
        blocks = [m for m in self.modules() if isinstance(m, GatedResnet) and m.cond is not None]
        if z is None or not blocks:
            return {}
        weight = concat(block.cond.weight for block in blocks)
        bias = concat(block.cond.bias for block in blocks)
        out = F.linear(z, weight, bias)[:, :, None, None]
        return dict(zip(blocks, out.split([block.cond.out_features for block in blocks], 1), strict=True))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """The mixture parameters; each layer's weights and latent bias are computed for all layers at
        once first (`normalized_weights`, `_conds`): a few operations instead of a few per layer; so is
        the dropout threshold the blocks compare their noise with."""
        self._check(x, z)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        weights = normalized_weights(m for m in self.modules() if isinstance(m, WNConv2d))
        conds = self._conds(z)
        threshold = torch.full((), self.dropout, device=x.device) if self.training and self.dropout else None
        outputs: list[torch.Tensor | None] = []
        for index, layer in enumerate(self.schedule):
            source = x if layer.source == IMAGE else outputs[layer.source]
            skips = tuple(outputs[s] for s in layer.skips)
            outputs.append(_apply(layer, source, skips, z, (weights, conds, threshold)))
            for done in self._released[index]:  # no later layer reads it: free it now
                outputs[done] = None
        return self.out(F.elu(outputs[-1]), weights)

    def _build_schedule(self) -> list[Layer]:
        """The U-net's wiring in forward order; every up-pass output is consumed once, in reverse."""
        schedule: list[Layer] = []

        def add(kind: str, stream: str, scale: int, modules: tuple, source: int, skips: tuple = ()) -> int:
            schedule.append(Layer(kind, stream, scale, modules, source, skips))
            return len(schedule) - 1

        us = [add("init_u", "u", 0, (self.u_init,), IMAGE)]
        uls = [add("init_ul", "ul", 0, (self.ul_init_up, self.ul_init_left), IMAGE)]
        for stage in range(self.n_stages):
            for block_u, block_ul in zip(self.up_u[stage], self.up_ul[stage], strict=True):
                us.append(add("block", "u", stage, (block_u,), us[-1]))
                uls.append(add("block", "ul", stage, (block_ul,), uls[-1], (us[-1],)))
            if stage < self.n_stages - 1:
                us.append(add("down", "u", stage + 1, (self.down_sample_u[stage],), us[-1]))
                uls.append(add("down", "ul", stage + 1, (self.down_sample_ul[stage],), uls[-1]))
        u, ul = us.pop(), uls.pop()
        for stage in range(self.n_stages):
            scale = self.n_stages - 1 - stage
            for block_u, block_ul in zip(self.down_u[stage], self.down_ul[stage], strict=True):
                u = add("block", "u", scale, (block_u,), u, (us.pop(),))
                ul = add("block", "ul", scale, (block_ul,), ul, (u, uls.pop()))
            if stage < self.n_stages - 1:
                u = add("up", "u", scale - 1, (self.up_sample_u[stage],), u)
                ul = add("up", "ul", scale - 1, (self.up_sample_ul[stage],), ul)
        return schedule


def _last_reads(schedule: list[Layer]) -> list[list[int]]:
    """For each layer, the earlier outputs that no layer after it reads (the last one is the result)."""
    last: dict[int, int] = {}
    for index, layer in enumerate(schedule):
        for read in (layer.source, *layer.skips):
            if read != IMAGE:
                last[read] = index
    released: list[list[int]] = [[] for _ in schedule]
    for read, index in last.items():
        released[index].append(read)
    return released


def _apply(
    layer: Layer,
    x: torch.Tensor,
    skips: tuple[torch.Tensor, ...],
    z: torch.Tensor | None,
    shared: tuple[Weights, dict[nn.Module, torch.Tensor], torch.Tensor | None],
) -> torch.Tensor:
    """A layer on whole maps, with this forward's weights, latent biases and dropout threshold."""
    weights, conds, threshold = shared
    if layer.kind == "init_u":
        return down_shift(layer.modules[0](x, weights))
    if layer.kind == "init_ul":
        up, left = layer.modules
        return down_shift(up(x, weights)) + right_shift(left(x, weights))
    if layer.kind == "block":
        block = layer.modules[0]
        return block(x, skips, z=z, cond=conds.get(block), weights=weights, threshold=threshold)
    return layer.modules[0](x, weights)
