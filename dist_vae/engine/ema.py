"""Exponential moving average of the weights, kept in fp32 whatever the training precision."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dist_vae.compat.torch_ops import copy_all_, lerp_all_


class EMA:
    """A frozen fp32 copy of `model` whose weights trail the trained ones.

    The effective decay is min(decay, (1 + n) / (10 + n)) after n updates, so early in training the
    average is not dominated by the random initialisation. Built before the model is compiled or
    wrapped (the copy must not share a compiled forward), it follows the same parameter objects, which
    DDP and DeepSpeed ZeRO-1/2 keep (they move or re-view the data, not the parameters), with a
    few foreach kernels per update.
    """

    def __init__(self, model: nn.Module, decay: float, device: torch.device | str = "cpu") -> None:
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False).to(device)
        self._source = (list(model.parameters()), list(model.buffers()))
        self._shadow = (list(self.model.parameters()), list(self.model.buffers()))

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        (params, buffers), (shadow, shadow_buffers) = self._source, self._shadow
        current = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in params]
        lerp_all_(shadow, current, 1.0 - decay)
        if buffers:
            copy_all_(shadow_buffers, buffers)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only; `decay` and `updates` are plain numbers the checkpoint keeps as JSON."""
        return self.model.state_dict()

    def load_state_dict(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        self.updates = updates
        self.model.load_state_dict(tensors)
