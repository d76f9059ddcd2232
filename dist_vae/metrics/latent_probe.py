"""How much of each scene factor a code holds: a linear read-out of the factors from posterior means.

The seed's claim 1 is about whether z carries information; KL and I(x; z) say how much, this says
what. Linear (least squares on the train codes, scored on val) so that it measures the code and not a
read-out network's own capacity: a discrete factor is read as the argmax of a least-squares fit to its
one-hot classes, a continuous one as a least-squares fit scored by R².
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dist_vae.metrics.probe import CONTINUOUS, DISCRETE, batched, encode_targets, r_squared
from dist_vae.models.protocol import GenerativeModel, evaluating

RIDGE = 1e-3  # keeps the normal equations solvable when some latent units are constant (collapsed)


@torch.no_grad()
def posterior_means(model: GenerativeModel, images: torch.Tensor) -> torch.Tensor:
    """The posterior mean of every image [N, 3, R, R] in [-1, 1], flattened to [N, D]."""
    with evaluating(model):
        return torch.cat(batched(lambda x: model.posterior(x).mean.flatten(1).double(), images))


def _fit(train: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Ridge weights [D + 1, K] of a linear map (with a bias) from codes [N, D] to targets [N, K]."""
    x = torch.cat([train, torch.ones(len(train), 1, dtype=train.dtype)], 1)
    gram = x.T @ x + RIDGE * len(x) * torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.solve(gram, x.T @ targets)


def linear_factor_scores(
    z_train: torch.Tensor,
    factors_train: Sequence[Mapping[str, Any]],
    z_val: torch.Tensor,
    factors_val: Sequence[Mapping[str, Any]],
) -> dict[str, float]:
    """Held-out accuracy per discrete factor and R² per continuous factor of a linear read-out of z."""
    mean, std = z_train.mean(0), z_train.std(0).clamp_min(1e-6)
    train, val = (z_train - mean) / std, (z_val - mean) / std
    bias = torch.ones(len(val), 1, dtype=val.dtype)
    classes, scaled = encode_targets(factors_train)
    val_classes, val_scaled = encode_targets(factors_val)
    report = {}
    for i, f in enumerate(DISCRETE):
        one_hot = torch.nn.functional.one_hot(classes[:, i], len(f.values)).to(train.dtype)
        pred = (torch.cat([val, bias], 1) @ _fit(train, one_hot)).argmax(1)
        report[f"{f.name}/accuracy"] = (pred == val_classes[:, i]).double().mean().item()
    pred = torch.cat([val, bias], 1) @ _fit(train, scaled.to(train.dtype))
    for i, f in enumerate(CONTINUOUS):
        report[f"{f.name}/r2"] = r_squared(pred[:, i], val_scaled[:, i].to(pred.dtype))
    return report
