"""Edge sharpness ranks a blurred scene below the scene itself, and an exact copy at 1."""

import numpy as np
import torch
import torch.nn.functional as F

from dist_vae.data.scenes import render, sample_factors
from dist_vae.metrics.probe import to_input
from dist_vae.metrics.sharpness import edge_sharpness


def test_blur_ranks_below_original() -> None:
    images = to_input(np.stack([render(sample_factors(0, i), 16) for i in range(4)]))
    kernel = torch.full((3, 1, 3, 3), 1 / 9)
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    exact = edge_sharpness(images, images)
    soft = edge_sharpness(blurred, images)
    assert torch.allclose(exact, torch.ones(4))
    assert (soft < 0.9 * exact).all(), (soft, exact)
