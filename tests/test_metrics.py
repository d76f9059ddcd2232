import math
from pathlib import Path

import pytest
import torch

from dist_vae.config import load_config
from dist_vae.data.stream import ShardStream
from dist_vae.metrics import (
    active_units,
    evaluate,
    importance_weighted_log_likelihood,
    laplacian_variance,
    model_mutual_information,
    mutual_information,
    sample_spread,
)
from dist_vae.models import build_model
from dist_vae.models.iterative_vae import IterativeVAE, IterativeVAEConfig
from dist_vae.models.pixel_vae import PixelVAE, PixelVAEConfig
from dist_vae.models.regularizers import gaussian_kl
from tests.data_fixtures import make_demo_shards


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


def _sharp_pixel_vae() -> PixelVAE:
    """A tiny PixelVAE whose posterior is narrow and away from the prior, and whose decoder listens to
    z: the ELBO then pays a large KL that importance weighting can win back."""
    torch.manual_seed(0)
    model = PixelVAE(
        PixelVAEConfig(latent_dim=3, nr_resnet=1, nr_filters=8, nr_mix=2, n_stages=2, encoder_channels=8), 8
    )
    with torch.no_grad():
        model.encoder.head.bias[3:] = -3.0  # log-variance
        for module in model.decoder.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(20.0)
    return model.double()


def test_importance_weighted_bound_is_tighter_than_the_elbo_and_tightens_with_k() -> None:
    model = _sharp_pixel_vae()
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    x = torch.round((x + 1) * 127.5) / 127.5 - 1
    mean, logvar = model.encode(x)
    g = torch.Generator().manual_seed(1)
    elbo = torch.stack([importance_weighted_log_likelihood(model, x, 1, g) for _ in range(32)]).mean(0)
    bounds = {k: importance_weighted_log_likelihood(model, x, k, g).mean().item() for k in (4, 32, 256)}
    assert gaussian_kl(mean, logvar).mean() > 2.0  # the setting is not degenerate
    assert elbo.mean().item() < bounds[4] < bounds[32] < bounds[256]
    # In bits/dim, as evaluate() reports: the IW value is the smaller (better) number.
    dims = x[0].numel()
    assert -bounds[256] / (dims * math.log(2)) < -elbo.mean().item() / (dims * math.log(2))


def test_importance_weighted_bound_rejects_zero_samples() -> None:
    with pytest.raises(ValueError, match="importance samples"):
        importance_weighted_log_likelihood(
            _sharp_pixel_vae(), torch.zeros(1, 3, 8, 8, dtype=torch.float64), 0
        )


def test_active_units_count_the_dimensions_whose_mean_moves() -> None:
    g = torch.Generator().manual_seed(0)
    mean = torch.cat([torch.randn(200, 3, generator=g), 0.01 * torch.randn(200, 2, generator=g)], dim=1)
    assert active_units(mean) == 3
    with pytest.raises(ValueError, match="N >= 2"):
        active_units(mean[:1])


def test_laplacian_variance_drops_when_images_are_blurred() -> None:
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1)
    sharp, fuzzy = laplacian_variance(images), laplacian_variance(blurred)
    assert sharp.shape == (4,) and bool((fuzzy < 0.2 * sharp).all())
    assert laplacian_variance(torch.zeros(2, 3, 8, 8)).abs().max() == 0


def test_sample_spread_is_zero_for_identical_draws_and_grows_with_noise() -> None:
    base = torch.rand(2, 1, 3, 8, 8, generator=torch.Generator().manual_seed(0)).expand(2, 4, 3, 8, 8)
    noise = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert sample_spread(base) == 0.0
    assert 0.05 < sample_spread(base + 0.1 * noise) < sample_spread(base + 0.3 * noise)
    with pytest.raises(ValueError, match="n_draws >= 2"):
        sample_spread(base[:, :1])


@pytest.fixture(scope="module")
def tiny_val_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_shards(tmp_path_factory.mktemp("shards"), 23, 8, 0.5)


@pytest.mark.parametrize("kind", ["pixel_vae", "iterative_vae"])
def test_evaluate_covers_the_whole_split_including_the_last_partial_batch(
    tiny_val_shards: Path, kind: str
) -> None:
    tiny = {
        "pixel_vae": [
            "nr_resnet=1",
            "nr_filters=8",
            "nr_mix=2",
            "n_stages=2",
            "latent_dim=4",
            "encoder_channels=8",
        ],
        "iterative_vae": ["channels=4", "latent_dims=[2]"],
    }[kind]
    overrides = [f"data.path={tiny_val_shards}", "data.resolution=8", f"model.kind={kind}"]
    cfg = load_config(None, overrides + [f"model.{o}" for o in tiny])
    torch.manual_seed(0)
    model = build_model(cfg.model, 8)
    stream = ShardStream(cfg.data, "val", batch_size=4, training=False)
    split = sum(x.shape[0] for x in stream)
    assert split % 4  # a partial last batch exists
    seen: list[int] = []
    result = evaluate(
        model, stream, iw_samples=3, generator=torch.Generator().manual_seed(0), progress=seen.append
    )
    assert result["images"] == split == sum(seen)
    assert 0 < result["elbo_bpd"] < 50 and result["kl"] >= 0
    latent = 4 if kind == "pixel_vae" else 2 * cfg.model.refine_steps
    assert result["latent_dim"] == latent and 0 <= result["active_units"] <= latent
    assert result["iw_bpd"] is not None and result["iw_bpd"] < result["elbo_bpd"] + 0.5
    assert result["mi_images"] == split
    assert result["mi"] is not None and -0.05 <= result["mi"] <= math.log(split) + 1e-6
    with pytest.raises(ValueError, match="no images"):
        evaluate(model, [])


def _informative_iterative_vae(steps: int) -> IterativeVAE:
    """A tiny iterative VAE whose encoder heads (zero at init: q = prior) are randomised, so every
    step's posterior depends on x and on the canvas."""
    torch.manual_seed(0)
    model = IterativeVAE(IterativeVAEConfig(refine_steps=steps, latent_dims=[3], channels=4), 8)
    with torch.no_grad():
        for step in model.steps:
            for head in step.encoder.heads.values():
                head[-1].weight.normal_(0.0, 0.5)
                head[-1].bias[3:] = -2.0  # log-variance
    return model.eval()


def _images(n: int, seed: int = 0) -> torch.Tensor:
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.round((x + 1) * 127.5) / 127.5 - 1


def test_iterative_importance_weights_average_to_the_elbo_and_the_bound_tightens_with_k() -> None:
    model, x = _informative_iterative_vae(3), _images(4)
    dims = x[0].numel()
    torch.manual_seed(3)
    with torch.no_grad():  # forward's -ELBO (analytic KL) averaged over as many posterior draws
        elbo_nats = -sum(model(x).scalars["bpd"].item() for _ in range(400)) / 400 * math.log(2) * dims
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([model.log_importance_weight(x, g) for _ in range(400)])
    assert model(x).scalars["kl"].item() > 2.0  # the posterior is not the prior
    assert draws.mean().item() == pytest.approx(elbo_nats, abs=0.01 * abs(elbo_nats))
    bounds = [importance_weighted_log_likelihood(model, x, k, g).mean().item() for k in (4, 64)]
    assert draws.mean().item() < bounds[0] < bounds[1]


def test_model_mutual_information_equals_the_gaussian_estimate_for_one_step() -> None:
    """With T = 1 the posterior is one Gaussian, so the chain estimator must agree with the closed form."""
    model, x = _informative_iterative_vae(1), _images(48)
    mean, logvar = model.steps[0].encoder(x, torch.zeros_like(x))
    gaussian = mutual_information(mean, logvar, samples=8, generator=torch.Generator().manual_seed(2))
    seeds = [torch.Generator().manual_seed(s) for s in range(8)]
    chain = torch.stack([model_mutual_information(model, x, g, batch_size=20) for g in seeds]).mean()
    assert 0.3 < gaussian.item() < math.log(48)
    assert chain.item() == pytest.approx(gaussian.item(), abs=0.1)


def test_model_mutual_information_is_zero_at_the_prior_and_positive_when_steps_listen() -> None:
    x = _images(16)
    prior = IterativeVAE(
        IterativeVAEConfig(refine_steps=2, latent_dims=[3], channels=4), 8
    ).eval()  # zero heads: q = p
    assert model_mutual_information(prior, x).item() == pytest.approx(0.0, abs=1e-9)
    informative = model_mutual_information(_informative_iterative_vae(2), x).item()
    assert 0.3 < informative <= math.log(16) + 1e-9
