import math

import pytest
import torch

from dist_vae.metrics import gaussian_kl, mutual_information


def gaussian_encoder(n: int, dim: int, s: float, a: float, v: float, seed: int = 0):
    """x ~ N(0, s^2 I), q(z|x) = N(a x, v I): I(x; z) = dim/2 * log(1 + a^2 s^2 / v) exactly."""
    g = torch.Generator().manual_seed(seed)
    x = s * torch.randn(n, dim, generator=g, dtype=torch.float64)
    logvar = torch.full_like(x, math.log(v))
    return a * x, logvar, 0.5 * dim * math.log1p(a * a * s * s / v)


@pytest.mark.parametrize(("dim", "a", "v"), [(1, 1.0, 0.25), (3, 0.5, 0.5)])
def test_mutual_information_matches_the_gaussian_closed_form(dim: int, a: float, v: float) -> None:
    mean, logvar, exact = gaussian_encoder(6000, dim, s=1.0, a=a, v=v)
    estimate = mutual_information(
        mean, logvar, samples=2, generator=torch.Generator().manual_seed(1), chunk=1000
    )
    assert estimate.item() == pytest.approx(exact, abs=0.04)


def test_mutual_information_does_not_underflow_in_many_dimensions() -> None:
    # Densities of 20-dimensional sharp codes are far below the smallest double; in log space the
    # estimate saturates at its ceiling log N (each code is identified by its own encoder).
    n = 500
    mean, logvar, exact = gaussian_encoder(n, 20, s=1.0, a=1.0, v=1e-4)
    assert exact > math.log(n)
    estimate = mutual_information(mean.float(), logvar.float(), generator=torch.Generator().manual_seed(0))
    assert math.isfinite(estimate.item())
    assert estimate.item() == pytest.approx(math.log(n), abs=1e-3)


def test_gaussian_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    torch.testing.assert_close(gaussian_kl(mean, logvar), torch.distributions.kl_divergence(q, p).sum(1))


def test_mutual_information_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="latent_dim"):
        mutual_information(torch.zeros(4, 3), torch.zeros(4, 2))
