"""The torch DataLoader adapter: it works on the installed torch, and refuses one that lacks a name."""

from __future__ import annotations

import multiprocessing
import os
import types
from collections.abc import Iterator

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from dist_vae.compat import torch_data
from dist_vae.errors import BackendError, DistVaeError


class _Pids(IterableDataset):
    def __iter__(self) -> Iterator[int]:
        while True:
            yield os.getpid()


def test_the_installed_torch_has_every_name_the_adapter_needs() -> None:
    torch_data.check_supported()


def test_shared_buffers_are_in_shared_memory_from_the_start() -> None:
    buffer = torch_data.shared_uint8((2, 3, 4, 4))
    assert buffer.is_shared() and buffer.dtype == torch.uint8 and buffer.shape == (2, 3, 4, 4)
    buffer.fill_(7)
    assert int(buffer.sum()) == 7 * 96


def test_shutdown_stops_the_workers_of_an_open_iteration() -> None:
    iteration = iter(DataLoader(_Pids(), batch_size=None, num_workers=1))
    worker = next(iteration)
    assert worker in [p.pid for p in multiprocessing.active_children()]
    torch_data.shutdown_workers(iteration)
    assert worker not in [p.pid for p in multiprocessing.active_children()]
    torch_data.shutdown_workers(iteration)  # a second call (the exit hook's) does nothing


def test_a_torch_without_a_needed_name_is_refused_naming_the_versions() -> None:
    class Storage:  # TypedStorage without _new_shared
        pass

    stand_in = types.SimpleNamespace(Tensor=torch.Tensor, TypedStorage=Storage)
    with pytest.raises(BackendError) as caught:
        torch_data.check_supported({"torch": stand_in})
    message = str(caught.value)
    assert "torch.TypedStorage._new_shared" in message
    assert f"torch {torch.__version__}" in message and torch_data.SUPPORTED in message
    assert "\n" not in message and isinstance(caught.value, DistVaeError)


def test_a_dataloader_without_shutdown_is_refused() -> None:
    stand_in = types.SimpleNamespace(_MultiProcessingDataLoaderIter=object)
    with pytest.raises(BackendError, match=r"_MultiProcessingDataLoaderIter\._shutdown_workers"):
        torch_data.check_supported({"torch.utils.data.dataloader": stand_in})
