import math

import pytest
import torch

from dist_vae.models import logistic_mixture as lm
from tests.model_fixtures import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

LEVELS = torch.arange(256, dtype=torch.float32) / 127.5 - 1.0


def random_params(nr_mix: int, batch: int = 1, side: int = 1, seed: int = 0) -> torch.Tensor:
    """Mixture parameters in the layout the network emits, with scales from sharp to broad."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, nr_mix, side, side)
    logits = torch.randn(shape, generator=g)
    means = torch.rand((batch, 3 * nr_mix, side, side), generator=g) * 2.4 - 1.2
    log_scales = torch.rand((batch, 3 * nr_mix, side, side), generator=g) * 4.5 - 5.0
    coeffs = torch.randn((batch, 3 * nr_mix, side, side), generator=g)
    return torch.cat([logits, means, log_scales, coeffs], dim=1)


@pytest.fixture(scope="module")
def enumerated() -> tuple[torch.Tensor, torch.Tensor]:
    """log P of all 256**3 values of one pixel, [256, 256, 256] indexed (r, g, b), and the params.

    About 20 s of CPU: 16.7M evaluations of the real `log_prob`, shared by the two tests below.
    """
    params = random_params(nr_mix=2)
    params[0, 2:4, 0, 0] = torch.tensor([-0.99, 0.99])  # red's means at both edges: the edge bins get mass
    green, blue = torch.meshgrid(LEVELS, LEVELS, indexing="ij")
    rows = []
    for red in LEVELS.split(8):
        x = torch.stack(
            [
                red[:, None, None].expand(-1, 256, 256),
                green.expand(len(red), -1, -1),
                blue.expand(len(red), -1, -1),
            ],
            dim=-1,
        ).reshape(-1, 3, 1, 1)
        rows.append(lm.log_prob(x, params.expand(len(x), -1, -1, -1)).reshape(len(red), 256, 256))
    return torch.cat(rows).double(), params


@pytest.mark.slow
def test_probabilities_of_all_values_of_a_pixel_sum_to_one(
    enumerated: tuple[torch.Tensor, torch.Tensor],
) -> None:
    log_p, _ = enumerated
    assert torch.isfinite(log_p).all()
    assert torch.logsumexp(log_p.flatten(), 0).exp().item() == pytest.approx(1.0, abs=1e-3)
    # The edge bins carry real mass, so the edge formulas are checked too.
    assert log_p[0].exp().sum() > 1e-2 and log_p[-1].exp().sum() > 1e-2


def test_samples_follow_the_scored_distribution(enumerated: tuple[torch.Tensor, torch.Tensor]) -> None:
    log_p, params = enumerated
    p = log_p.exp()
    p = p / p.sum()
    levels = LEVELS.double()
    expected = {
        "r": (p.sum((1, 2)) * levels).sum(),
        "g": (p.sum((0, 2)) * levels).sum(),
        "b": (p.sum((0, 1)) * levels).sum(),
        "rg": (p.sum(2) * levels[:, None] * levels[None, :]).sum(),
        "r_edge": p[0].sum(),
    }
    n = 40_000
    x = lm.sample(params.expand(n, -1, -1, -1), torch.Generator().manual_seed(3))[:, :, 0, 0].double()
    assert torch.isin(x.float(), LEVELS).all(), "samples must lie on the 256-level grid"
    got = {
        "r": x[:, 0].mean(),
        "g": x[:, 1].mean(),
        "b": x[:, 2].mean(),
        "rg": (x[:, 0] * x[:, 1]).mean(),
        "r_edge": (x[:, 0] == -1.0).double().mean(),
    }
    for key, value in expected.items():
        assert got[key].item() == pytest.approx(value.item(), abs=0.02), key


def test_sampling_is_reproducible_with_a_generator() -> None:
    params = random_params(nr_mix=4, batch=2, side=4)
    a = lm.sample(params, torch.Generator().manual_seed(5))
    b = lm.sample(params, torch.Generator().manual_seed(5))
    assert a.shape == (2, 3, 4, 4) and torch.equal(a, b)


def test_log_prob_is_computed_in_fp32_under_autocast() -> None:
    params = random_params(nr_mix=5, batch=2, side=4, seed=1).bfloat16()
    x = LEVELS[torch.randint(0, 256, (2, 3, 4, 4), generator=torch.Generator().manual_seed(0))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = lm.log_prob(x.bfloat16(), params)
    reference = lm.log_prob(x.bfloat16().float(), params.float())
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference, rtol=1e-6, atol=1e-4)


def test_edges_and_far_tails_stay_finite_and_sensible() -> None:
    # One sharp component just outside [-1, 1]: the edge bin takes all of its mass.
    n = 1
    params = torch.zeros(2, 10 * n, 1, 1)
    params[0, n : 4 * n] = -1.3
    params[1, n : 4 * n] = 1.3
    params[:, 4 * n : 7 * n] = -4.0
    x = torch.tensor([-1.0, 1.0])[:, None, None, None].expand(2, 3, 1, 1)
    assert lm.log_prob(x, params).abs().max() < 1e-4
    # The opposite edge and the middle lie in far tails, where the cdf difference underflows.
    for far in (lm.log_prob(-x, params), lm.log_prob(torch.zeros_like(x), params)):
        assert torch.isfinite(far).all() and (far < -100).all()


def test_bad_shapes_name_what_was_expected() -> None:
    with pytest.raises(ValueError, match="10 \\* nr_mix"):
        lm.log_prob(torch.zeros(1, 3, 2, 2), torch.zeros(1, 7, 2, 2))
    with pytest.raises(ValueError, match="do not match"):
        lm.log_prob(torch.zeros(1, 3, 2, 2), torch.zeros(1, 10, 3, 3))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        lm.log_prob(torch.zeros(1, 1, 2, 2), torch.zeros(1, 10, 2, 2))


def test_bits_per_dim_converts_nats_per_image() -> None:
    dims = 3 * 8 * 8
    assert lm.bits_per_dim(torch.tensor(dims * math.log(2.0) * 2.5), dims).item() == pytest.approx(2.5)
