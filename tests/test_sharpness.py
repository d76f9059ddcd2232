"""Edge sharpness ranks a blurred scene below the scene itself; the decoder spread comes per step."""

import numpy as np
import torch
import torch.nn.functional as F

from dist_vae.config import load_config
from dist_vae.data.scenes import render, sample_factors
from dist_vae.metrics import sample_spread_per_step
from dist_vae.metrics.probe import to_input
from dist_vae.metrics.sharpness import edge_sharpness
from dist_vae.models import build_model


def test_blur_ranks_below_original() -> None:
    images = to_input(np.stack([render(sample_factors(0, i), 16) for i in range(4)]))
    kernel = torch.full((3, 1, 3, 3), 1 / 9)
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    exact = edge_sharpness(images, images)
    soft = edge_sharpness(blurred, images)
    assert torch.allclose(exact, torch.ones(4))
    assert (soft < 0.9 * exact).all(), (soft, exact)


def test_spread_per_step_is_zero_for_a_gaussian_decoder_at_every_step() -> None:
    """The iterative VAE's steps output their means: one spread per step, each 0 for fixed codes."""
    cfg = load_config(
        None,
        ["model.kind=iterative_vae", "model.refine_steps=3", "model.channels=4", "model.latent_dims=[2,2]"],
    )
    model = build_model(cfg.model, 8, False)
    generator = torch.Generator().manual_seed(0)
    spreads = sample_spread_per_step(model, model.prior_sample(2, generator), 3, generator)
    assert spreads == [0.0, 0.0, 0.0]
