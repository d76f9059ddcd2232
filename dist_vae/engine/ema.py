"""Exponential moving average of the weights, kept in fp32 whatever the training precision."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen fp32 copy of the model whose weights trail the trained ones.

    The effective decay is min(decay, (1 + n) / (10 + n)) after n updates, so early in training the
    average is not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        shadow = list(self.model.parameters())
        current = [p.detach().float() for p in model.parameters()]
        if len(shadow) != len(current):
            raise ValueError(f"EMA holds {len(shadow)} parameters but the model has {len(current)}")
        torch._foreach_lerp_(shadow, current, 1.0 - decay)
        for ema_buf, buf in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_buf.copy_(buf)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only; `decay` and `updates` are plain numbers the checkpoint keeps as JSON."""
        return self.model.state_dict()

    def load_state_dict(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        self.updates = updates
        self.model.load_state_dict(tensors)
