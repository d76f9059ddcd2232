"""The linear read-out of scene factors from codes (claim 1 of the scenes study): a code that holds
the factors reads them back, a code of noise reads none of them."""

from __future__ import annotations

from collections import Counter

import torch

from dist_vae.data.scenes import sample_factors
from dist_vae.metrics.latent_probe import linear_factor_scores
from dist_vae.metrics.probe import DISCRETE, encode_targets


def codes(factors: list[dict], informative: bool, seed: int) -> torch.Tensor:
    """[N, 24] codes: the factors (one-hot classes, scaled values) plus noise, or noise alone."""
    gen = torch.Generator().manual_seed(seed)
    classes, scaled = encode_targets(factors)
    one_hot = [torch.nn.functional.one_hot(classes[:, i], len(f.values)) for i, f in enumerate(DISCRETE)]
    signal = torch.cat([*one_hot, scaled], 1).double()
    noise = 0.05 * torch.randn(len(factors), 24, generator=gen, dtype=torch.float64)
    noise[:, : signal.shape[1]] += signal if informative else 0.0
    return noise


def test_a_code_holding_the_factors_reads_back_and_noise_reads_nothing() -> None:
    train = [sample_factors(0, i) for i in range(800)]
    val = [sample_factors(1, i) for i in range(300)]
    held = linear_factor_scores(codes(train, True, 0), train, codes(val, True, 1), val)
    blind = linear_factor_scores(codes(train, False, 0), train, codes(val, False, 1), val)
    assert len(held) == len(blind) == 10
    for name, value in held.items():
        assert value > 0.9, (name, value)
    for name, value in blind.items():
        factor, kind = name.split("/")
        chance = 0.0 if kind == "r2" else Counter(f[factor] for f in val).most_common(1)[0][1] / len(val)
        assert value < chance + 0.1, (name, value)
