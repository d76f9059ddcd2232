"""FID, KID and precision/recall/density/coverage of two sets of Inception features.

The arithmetic is the libraries': torchmetrics' FrechetInceptionDistance and KernelInceptionDistance,
prdc's `compute_prdc` (Naeem et al. 2020), all on the same features. The features are computed
beforehand (embed.py: spread over the ranks, gathered; reference.py: cached), so the torchmetrics
metrics get a feature module that passes them through, and do not synchronise again.

What the numbers mean (README "Evaluate"): FID, the Fréchet distance between Gaussians fitted to the
two sets (lower is better; biased upwards at small N, so only FIDs at the same N compare); KID, an
unbiased squared MMD with a cubic polynomial kernel (mean and std over random subsets; ~0 for one
distribution); precision, the share of generated images inside the real set's k-NN balls (fidelity);
recall, the share of real images inside the generated set's balls (diversity); density and
coverage, the less outlier-prone versions of the two.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import torch
from prdc import compute_prdc
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from dist_vae.metrics.settings import EvalConfig


class GivenFeatures(nn.Module):
    """The feature module torchmetrics calls: its input is already Inception features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet Inception distance (torchmetrics, float64)."""
    metric = FrechetInceptionDistance(feature=GivenFeatures(real.shape[1]), sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kid(
    real: torch.Tensor, fake: torch.Tensor, subsets: int, subset_size: int, seed: int = 0
) -> tuple[float, float]:
    """KID mean and std over `subsets` random subsets of min(subset_size, N) images, seeded."""
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # that it keeps every feature: it is given them all anyway
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(
            feature=GivenFeatures(real.shape[1]), subsets=subsets, subset_size=size, sync_on_compute=False
        )
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def sample_quality(
    real: torch.Tensor, fake: torch.Tensor, cfg: EvalConfig, seed: int = 0
) -> dict[str, float]:
    """Every number of one comparison, named as eval.json and TensorBoard name them."""
    kid_mean, kid_std = kid(real, fake, cfg.kid_subsets, cfg.kid_subset_size, seed)
    k = min(cfg.nearest_k, len(real) - 2, len(fake) - 2)  # prdc needs k + 1 < N
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes; stdout may be JSON
        prdc = compute_prdc(
            real_features=real.float().numpy(), fake_features=fake.float().numpy(), nearest_k=k
        )
    return {
        "fid": fid(real, fake),
        "kid": kid_mean,
        "kid_std": kid_std,
        **{name: float(value) for name, value in prdc.items()},
        "n": len(fake),
    }
