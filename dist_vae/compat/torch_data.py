"""The private names of torch that the data stream needs, behind one adapter.

Supported: torch 2.1 (the project's floor) to 2.13 (the suite runs on 2.13.0). Every name below has
had this meaning since torch 2.0 introduced `TypedStorage`; none is public API, so a newer torch may
move one. `check_supported` then refuses with one line naming the installed and supported versions,
instead of an AttributeError inside a DataLoader worker.

- `Tensor._typed_storage()._new_shared`: a buffer in shared memory from the start, as
  `default_collate` makes a worker's batches (`share_memory_()` would allocate, then copy).
- `_MultiProcessingDataLoaderIter._shutdown_workers`: stop an iteration's workers now; torch
  calls it only when the iterator is garbage collected, and at exit it would wait on workers that
  ignore SIGTERM (data/workers.py).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from dist_vae.errors import BackendError

SUPPORTED = "torch >= 2.1, <= 2.13"
NEEDED = (  # (module, attribute path inside it)
    ("torch", "Tensor._typed_storage"),
    ("torch", "TypedStorage._new_shared"),
    ("torch.utils.data.dataloader", "_MultiProcessingDataLoaderIter._shutdown_workers"),
)


def check_supported(modules: Mapping[str, Any] | None = None) -> None:
    """BackendError naming the first needed name this torch lacks (`modules`: stand-ins by name)."""
    modules = modules or {}
    for module, path in NEEDED:
        owner = modules[module] if module in modules else importlib.import_module(module)
        for part in path.split("."):
            owner = getattr(owner, part, None)
            if owner is None:
                raise BackendError(
                    f"torch {torch.__version__} has no {module}.{path}, which dist_vae's data stream "
                    f"needs (dist_vae/compat/torch_data.py supports {SUPPORTED}); install a supported torch"
                )


def shared_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty uint8 tensor of `shape` whose storage is in shared memory from the start."""
    empty = torch.empty(0, dtype=torch.uint8)
    storage = empty._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return empty.new(storage).view(shape)


def shutdown_workers(iteration: Iterator[Any]) -> None:
    """Stop the worker processes of a DataLoader iteration now (a no-op once they are stopped)."""
    iteration._shutdown_workers()  # type: ignore[attr-defined]
