"""Edge sharpness against known edges: how steep an image is where a reference image has its edges.

Why against a reference: a blurred sample has low gradients everywhere, a noisy one high gradients
everywhere, so a global measure (Laplacian variance) rewards noise. Reading the gradient only on the
reference's edge pixels (the true image for a reconstruction, the scene re-rendered from the probe's
factors for a sample) and dividing by the reference's own gradient there gives 1 for edges as steep
as the generator's, below 1 for blurred ones.
"""

from __future__ import annotations

import torch


def gradient_magnitude(images: torch.Tensor) -> torch.Tensor:
    """Per pixel |grad| of the grey image ([B, 3, H, W] -> [B, H-1, W-1]), forward differences."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    grey = images.float().mean(dim=1)
    dx = grey[:, :-1, 1:] - grey[:, :-1, :-1]
    dy = grey[:, 1:, :-1] - grey[:, :-1, :-1]
    return (dx.square() + dy.square()).sqrt()


def edge_sharpness(images: torch.Tensor, reference: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Per image: mean |grad| of `images` on the reference's edge pixels (|grad| > threshold, pixels in
    [-1, 1]) over the reference's mean |grad| there; 0 where the reference has no edge."""
    ref = gradient_magnitude(reference)
    mask = (ref > threshold).float()
    steep = (gradient_magnitude(images) * mask).flatten(1).sum(1)
    return steep / (ref * mask).flatten(1).sum(1).clamp_min(1e-8)
