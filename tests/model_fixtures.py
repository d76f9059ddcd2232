"""Fixtures for the model tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models on one thread: deterministic, and no OpenMP barrier waits when the test machine's
    cores are busy with other work (two threads then made these tests several times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fit(
    model: torch.nn.Module,
    batch: torch.Tensor | Callable[[], torch.Tensor],
    opt: torch.optim.Optimizer,
    steps: int,
) -> list[dict[str, float]]:
    """`steps` plain updates on the model's full loss (one batch, or a fresh one from `batch()` each
    step); each step's loss and named scalars, for tests that check what training did."""
    history = []
    for step in range(steps):
        out = model(batch() if callable(batch) else batch, step=step)
        opt.zero_grad()
        out.total().backward()
        opt.step()
        history.append({"loss": out.loss.item(), **{k: v.item() for k, v in out.scalars.items()}})
    return history


def noise_template(generator: torch.Generator) -> torch.Tensor:
    """The fixed 8x8 image [1, 3, 8, 8] of the posterior-collapse case, in [-0.6, 0.6]."""
    return torch.rand(1, 3, 8, 8, generator=generator) * 1.2 - 0.6


def template_plus_noise(n: int, template: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One fixed image plus independent pixel noise, on the 8-bit grid: nothing in an image that a
    decoder modelling each pixel from the ones before it could not model alone."""
    x = (template + 0.25 * torch.randn(n, 3, 8, 8, generator=generator)).clamp(-1, 1)
    return torch.round((x + 1) * 127.5) / 127.5 - 1
