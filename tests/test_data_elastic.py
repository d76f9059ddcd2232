"""Elastic resume at the stream level: real gloo processes stop at a step, resume on 1 and on 3 processes.

Every rank records the sample keys of its batches (with_keys=True) and the positions they name, so
the test can account for each sample of the first epoch: seen once, none lost.
"""

from __future__ import annotations

import json
import os
import random
import socket
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_vae.config import DataConfig
from dist_vae.data.shards import ShardSettings, build_shards
from dist_vae.data.stream import ShardStream
from dist_vae.files import write_text_atomic
from tests.data_fixtures import id_images

N_IMAGES, BATCH, SEED = 45, 3, 11


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _consume(rank: int, world: int, port: int, shards: str, workers: int, state: dict | None,
             batches: int, out: str) -> None:  # fmt: skip
    """One rank: join the gloo group, resume at `state`, take `batches` batches, write what it saw."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = DataConfig(path=shards, resolution=8, num_workers=workers, shuffle_group=2)
    stream = ShardStream(cfg, "train", rank, world, SEED, batch_size=BATCH, with_keys=True)
    if state is not None:
        stream.load_state_dict(state)
    start = stream.position
    seen = []
    for k, (_, keys) in zip(range(batches), stream, strict=False):
        first = start + k * world * BATCH + rank * BATCH
        seen += [[first + i, key] for i, key in enumerate(keys)]
    count = torch.tensor([len(seen) // BATCH])
    low, high = count.clone(), count.clone()
    dist.all_reduce(low, dist.ReduceOp.MIN)
    dist.all_reduce(high, dist.ReduceOp.MAX)
    record = {"seen": seen, "state": stream.state_dict(), "batches": [int(low), int(high)]}
    write_text_atomic(Path(out) / f"rank-{rank}.json", json.dumps(record))
    dist.destroy_process_group()


def run(world: int, shards: Path, workers: int, state: dict | None, batches: int, out: Path) -> list[dict]:
    out.mkdir()
    args = (world, _free_port(), str(shards), workers, state, batches, str(out))
    mp.start_processes(_consume, args=args, nprocs=world, join=True, start_method="spawn")
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world)]


@pytest.mark.slow
def test_two_processes_resume_on_one_and_on_three_without_loss_or_repeat(tmp_path: Path) -> None:
    id_images(tmp_path / "images", N_IMAGES)
    settings = ShardSettings(
        source=f"folder:{tmp_path / 'images'}", resolution=8, format="png", shard_size=7, val_fraction=0.0
    )
    build_shards(settings, tmp_path / "shards", progress=False)
    os.environ["OMP_NUM_THREADS"] = "1"
    stop = random.Random(11).randrange(1, N_IMAGES // (2 * BATCH))  # a step inside the first epoch
    first = run(2, tmp_path / "shards", 2, None, stop, tmp_path / "w2")
    state = first[0]["state"]
    assert all(r["state"] == state for r in first) and state["position"] == stop * 2 * BATCH
    assert all(r["batches"] == [stop, stop] for r in first)
    for world, workers in [(1, 0), (3, 1)]:
        rest = -(-(N_IMAGES - state["position"]) // (world * BATCH))  # batches to finish the epoch
        second = run(world, tmp_path / "shards", workers, state, rest, tmp_path / f"w{world}")
        assert all(r["batches"] == [rest, rest] for r in second)
        seen = [tuple(p) for r in first + second for p in r["seen"]]
        epoch0 = Counter(key for position, key in seen if position < N_IMAGES)
        epoch1 = Counter(key for position, key in seen if position >= N_IMAGES)
        expected = {f"class{i % 3}/img{i:03d}.png" for i in range(N_IMAGES)}
        duplicates = sum(n - 1 for n in epoch0.values()) + sum(n - 1 for n in epoch1.values())
        lost = len(expected - set(epoch0))
        print(
            f"2 processes stopped at step {stop} (position {state['position']}), resumed on {world}: "
            f"samples per epoch {N_IMAGES}, seen in epoch 0 {sum(epoch0.values())}, "
            f"duplicates {duplicates}, lost {lost}, epoch-1 samples already served {sum(epoch1.values())}"
        )
        assert set(epoch0) == expected and sum(epoch0.values()) == N_IMAGES
        assert duplicates == 0 and lost == 0
