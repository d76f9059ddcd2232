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
