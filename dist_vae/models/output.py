"""The one thing every model hands the engine: what to minimise and what to log."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LossOutput:
    """Result of `model(x, step=...)`.

    `loss` is minimised by the model's main optimiser group. `aux_losses` maps a parameter-group name
    (as returned by the model's `param_groups()`) to a loss that only that group's parameters receive
    gradients from, e.g. the adversarial critic; the engine backpropagates `total()` once. `scalars`
    are detached values for the logs (bits/dim under the key 'bpd').
    """

    loss: torch.Tensor
    scalars: dict[str, torch.Tensor] = field(default_factory=dict)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)

    def total(self) -> torch.Tensor:
        return self.loss + sum(self.aux_losses.values(), torch.zeros((), device=self.loss.device))
