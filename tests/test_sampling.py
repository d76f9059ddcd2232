import pytest
import torch

from dist_vae.models.iterative_vae import IterativeVAE, IterativeVAEConfig
from dist_vae.models.pixel_vae import PixelVAE, PixelVAEConfig
from dist_vae.sampling import ancestral_samples, cached_decode, iterative_canvases, markov_chain


def tiny_pixel_vae(side: int, n_stages: int) -> PixelVAE:
    torch.manual_seed(0)
    cfg = PixelVAEConfig(
        latent_dim=4, nr_resnet=2, nr_filters=8, nr_mix=3, n_stages=n_stages, encoder_channels=8
    )
    model = PixelVAE(cfg, side)
    # float64 so that summation order (window vs whole-image convolution) cannot move a sample
    # across a bin edge; the comparison below is then exact.
    return model.double()


@pytest.mark.parametrize(("side", "n_stages"), [(8, 2), (16, 3)])
def test_cached_generation_equals_naive_generation(side: int, n_stages: int) -> None:
    model = tiny_pixel_vae(side, n_stages).train()  # decoding must switch dropout off itself
    z = torch.randn(2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    naive = model.decode(z, torch.Generator().manual_seed(3))
    cached = cached_decode(model, z, torch.Generator().manual_seed(3))
    assert torch.equal(naive, cached)
    assert model.training
    # A different seed gives a different image: equality above is not a constant output.
    other = cached_decode(model, z, torch.Generator().manual_seed(4))
    assert not torch.equal(other, cached)
    levels = (cached + 1.0) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4) and cached.min() >= -1 and cached.max() <= 1


def test_ancestral_and_markov_chain_match_their_naive_versions() -> None:
    model = tiny_pixel_vae(8, 2)
    a = ancestral_samples(model, 2, torch.Generator().manual_seed(5))
    b = ancestral_samples(model, 2, torch.Generator().manual_seed(5), cached=False)
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, b)
    start = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 2 - 1
    chain = markov_chain(model, start, 2, torch.Generator().manual_seed(7))
    naive = markov_chain(model, start, 2, torch.Generator().manual_seed(7), cached=False)
    assert len(chain) == 3 and torch.equal(chain[0], start)
    for cached_x, naive_x in zip(chain, naive, strict=True):
        assert torch.equal(cached_x, naive_x)
    assert not torch.equal(chain[1], chain[2])


def test_markov_chain_rejects_starts_outside_the_data_range() -> None:
    model = tiny_pixel_vae(8, 2)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        markov_chain(model, torch.full((1, 3, 8, 8), 1.5, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match="chain start"):
        markov_chain(model, torch.zeros(1, 3, 16, 16, dtype=torch.float64), 1)


def test_iterative_canvases_are_one_per_step_and_deterministic_for_a_seed() -> None:
    torch.manual_seed(0)
    model = IterativeVAE(IterativeVAEConfig(refine_steps=3, latent_dims=[2, 3], channels=4), 16).train()
    canvases = iterative_canvases(model, 2, torch.Generator().manual_seed(0))
    again = iterative_canvases(model, 2, torch.Generator().manual_seed(0))
    assert len(canvases) == 3 and all(c.shape == (2, 3, 16, 16) for c in canvases)
    assert all(torch.equal(a, b) for a, b in zip(canvases, again, strict=True))
    assert model.training
