"""Conditional PixelCNN++ (Salimans et al. 2017): two causal streams in a U-net of gated resnets.

The "u" stream sees only rows above a pixel, the "ul" stream rows above plus the pixels to its
left; together they cover the whole causal context without a blind spot. Each of `n_stages` stages
runs `nr_resnet` gated blocks per stream at one resolution; the down pass mirrors the up pass and
takes every up-pass output as a skip input. A latent z (cond_dim) biases every gated block.
"""

from __future__ import annotations

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
        self.n_stages, self.cond_dim = n_stages, cond_dim
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

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x, z)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        us = [down_shift(self.u_init(x))]
        uls = [down_shift(self.ul_init_up(x)) + right_shift(self.ul_init_left(x))]
        for stage in range(self.n_stages):
            for block_u, block_ul in zip(self.up_u[stage], self.up_ul[stage], strict=True):
                us.append(block_u(us[-1], z=z))
                uls.append(block_ul(uls[-1], (us[-1],), z=z))
            if stage < self.n_stages - 1:
                us.append(self.down_sample_u[stage](us[-1]))
                uls.append(self.down_sample_ul[stage](uls[-1]))
        u, ul = us.pop(), uls.pop()
        for stage in range(self.n_stages):
            for block_u, block_ul in zip(self.down_u[stage], self.down_ul[stage], strict=True):
                u = block_u(u, (us.pop(),), z=z)
                ul = block_ul(ul, (u, uls.pop()), z=z)
            if stage < self.n_stages - 1:
                u = self.up_sample_u[stage](u)
                ul = self.up_sample_ul[stage](ul)
        return self.out(F.elu(ul))
