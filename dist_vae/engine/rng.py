"""Keeping side work (data fetching, evaluation, sampling) from drawing on the training RNG streams.

Resuming is bit-exact only if the dropout/noise streams see exactly the same draws as in an
uninterrupted run; a DataLoader seeding its workers or an evaluation pass would otherwise consume
draws at moments that differ between the two.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


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
