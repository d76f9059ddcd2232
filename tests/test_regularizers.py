import pytest
import torch

from dist_vae.models.regularizers import Critic, mmd, stein
from tests.model_fixtures import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def codes(shift: float, n: int = 64, dim: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) + shift


def test_mmd_separates_shifted_codes_from_the_prior() -> None:
    prior = codes(0.0, seed=1)
    matched, shifted = mmd(codes(0.0), prior), mmd(codes(1.5), prior)
    assert abs(matched.item()) < 0.05 < shifted.item()


def test_stein_steps_move_codes_towards_the_prior() -> None:
    z = codes(2.0).requires_grad_(True)
    first = stein(z).item()
    opt = torch.optim.SGD([z], lr=20.0)
    for _ in range(50):
        opt.zero_grad()
        stein(z).backward()
        opt.step()
    assert z.detach().mean().abs() < 1.0, "SVGD should pull the codes' mean from 2 towards 0"
    assert stein(z).item() < 0.5 * first


@pytest.mark.parametrize("divergence", [mmd, stein])
def test_divergences_ignore_autocast(divergence) -> None:
    z, prior = codes(0.5), codes(0.0, seed=1)
    args = (z, prior) if divergence is mmd else (z,)
    reference = divergence(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = divergence(*args)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference)


def test_critic_divergence_sends_no_gradient_to_the_critic() -> None:
    torch.manual_seed(0)
    critic = Critic(6, 16)
    z = codes(1.0).requires_grad_(True)
    critic.divergence(z).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in critic.parameters())
    critic.loss(z, codes(0.0, seed=1)).backward()
    assert all(p.grad is not None for p in critic.parameters())
