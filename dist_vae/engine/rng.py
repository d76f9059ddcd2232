"""Random streams derived from (seed, step, rank), so none has to be saved in a checkpoint.

Every training step starts by re-seeding python, numpy and torch (CPU and CUDA) from a hash of the
run's seed, the step and the rank: a resumed run, on the same or on another number of processes,
draws exactly what an uninterrupted run with that many processes draws. Side work inside a step
(fetching a batch, whose DataLoader may seed its workers from the global stream) runs inside
`preserved_rng` so it takes no draws from the step's stream.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from dist_vae.data.order import mix


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 64-bit seed that differs for every (seed, step, rank) triple (the data order's own hash)."""
    return mix(seed, step, rank)


def seed_everything_for_step(seed: int, step: int, rank: int) -> None:
    """Seed python, numpy and torch (every CUDA device too) for training step `step` on `rank`."""
    derived = step_seed(seed, step, rank)
    random.seed(derived)
    np.random.seed(derived % 2**32)  # numpy's legacy global generator takes 32 bits
    torch.manual_seed(derived)  # also seeds every CUDA device


@contextmanager
def preserved_rng() -> Iterator[None]:
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
