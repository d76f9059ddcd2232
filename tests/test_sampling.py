import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dist_vae.models.iterative_vae import IterativeVAE, IterativeVAEConfig
from dist_vae.models.pixel_vae import PixelVAE, PixelVAEConfig
from dist_vae.sampling import grid_samples, markov_chain, prior_samples, reconstructions


def tiny_pixel_vae(side: int, n_stages: int) -> PixelVAE:
    torch.manual_seed(0)
    cfg = PixelVAEConfig(
        latent_dim=4, nr_resnet=2, nr_filters=8, nr_mix=3, n_stages=n_stages, encoder_channels=8
    )
    # float64 so that summation order (window vs whole-image convolution) cannot move a sample
    # across a bin edge; the comparison below is then exact.
    return PixelVAE(cfg, side).double()


@pytest.mark.parametrize(("side", "n_stages"), [(8, 2), (16, 3)])
def test_cached_generation_equals_naive_generation(side: int, n_stages: int) -> None:
    model = tiny_pixel_vae(side, n_stages).train()  # decoding must switch dropout off itself
    z = torch.randn(2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    naive = model.generate(z, torch.Generator().manual_seed(3), cached=False)
    cached = model.generate(z, torch.Generator().manual_seed(3))
    assert torch.equal(naive, cached)
    assert model.training
    # A different seed gives a different image: equality above is not a constant output.
    other = model.generate(z, torch.Generator().manual_seed(4))
    assert not torch.equal(other, cached)
    levels = (cached + 1.0) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4) and cached.min() >= -1 and cached.max() <= 1


def test_prior_samples_and_markov_chain_match_naive_generation() -> None:
    model = tiny_pixel_vae(8, 2)
    g, g_naive = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    (a,) = prior_samples(model, 2, g)
    b = model.generate(model.prior_sample(2, g_naive), g_naive, cached=False)
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, b)
    start = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 2 - 1
    chain = markov_chain(model, start, 2, torch.Generator().manual_seed(7))
    g_naive = torch.Generator().manual_seed(7)
    naive = [start]
    for _ in range(2):
        naive.append(model.generate(model.posterior_sample(naive[-1], g_naive), g_naive, cached=False))
    assert len(chain) == 3 and torch.equal(chain[0], start)
    for cached_x, naive_x in zip(chain, naive, strict=True):
        assert torch.equal(cached_x, naive_x)
    assert not torch.equal(chain[1], chain[2])
    assert model.training


def test_markov_chain_rejects_starts_outside_the_data_range() -> None:
    model = tiny_pixel_vae(8, 2)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        markov_chain(model, torch.full((1, 3, 8, 8), 1.5, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match="chain start"):
        markov_chain(model, torch.zeros(1, 3, 16, 16, dtype=torch.float64), 1)


def test_iterative_samples_are_one_per_step_and_deterministic_for_a_seed() -> None:
    torch.manual_seed(0)
    model = IterativeVAE(IterativeVAEConfig(refine_steps=3, latent_dims=[2, 3], channels=4), 16).train()
    canvases = prior_samples(model, 2, torch.Generator().manual_seed(0))
    again = prior_samples(model, 2, torch.Generator().manual_seed(0))
    assert len(canvases) == 3 and all(c.shape == (2, 3, 16, 16) for c in canvases)
    assert all(torch.equal(a, b) for a, b in zip(canvases, again, strict=True))
    assert grid_samples(model, 2, torch.Generator().manual_seed(0))[2].shape == (2, 3, 16, 16)  # row per step
    x = canvases[-1]
    assert len(reconstructions(model, x)) == 3 and model.training


def test_grid_rows_tile_one_step_samples_near_square() -> None:
    model = tiny_pixel_vae(8, 2)
    rows = grid_samples(model, 5, torch.Generator().manual_seed(0))
    assert [r.shape[0] for r in rows] == [3]  # 3 per row; the short last row is dropped
    assert model.training


def test_cached_generation_under_autocast_casts_each_frozen_weight_once() -> None:
    """Autocast caches casts of leaf parameters only, so the sampler's detached weights would be cast
    again at every generated pixel: they are cast once, when frozen. The bias stays in float32."""
    torch.manual_seed(0)
    model = PixelVAE(PixelVAEConfig(latent_dim=4, nr_resnet=1, nr_filters=8, nr_mix=3, n_stages=2), 8).eval()
    conv = model.decoder.out
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weight, bias = conv.frozen()
    assert (weight.dtype, bias.dtype) == (torch.bfloat16, torch.float32)
    assert torch.equal(weight, conv.frozen()[0].to(torch.bfloat16))
    casts = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].dim() == 4 and args[0].shape[0] > 1:
                casts.append(tuple(args[0].shape))  # weights [out, in, kh, kw]; maps' windows have batch 1
            return func(*args, **(kwargs or {}))

    z = torch.randn(1, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), Casts():
        model.generate(z, torch.Generator().manual_seed(3))
    layers = sum(1 for m in model.decoder.modules() if type(m).__name__ == "WNConv2d")
    assert 0 < len(casts) <= layers, (len(casts), layers)  # once each, at freezing: not per pixel
