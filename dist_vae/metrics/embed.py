"""Inception features of N images spread over the ranks, gathered in one order on every rank.

N images are cut into fixed chunks of `batch` images (the last may be short) and each rank takes a
contiguous share of the chunks. A chunk is generated (seeded by its index) and embedded as one
batch whatever the world size, so one process and several compute the same features and gather
them in the same order; ranks exchange features (2048 floats an image), never images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import distributed as dist

from dist_vae.data.stream import DataError, ShardStream
from dist_vae.distributed import agreed, gather_rows, share, world
from dist_vae.files import to_uint8
from dist_vae.metrics.inception import InceptionFeatures


def chunks(n: int, batch: int) -> list[range]:
    """Image index ranges of the chunks of n images."""
    return [range(start, min(n, start + batch)) for start in range(0, n, batch)]


def rank_chunks(n: int, batch: int, rank: int, world_size: int) -> list[range]:
    """This rank's contiguous share of the chunks."""
    every = chunks(n, batch)
    return [every[i] for i in share(len(every), rank, world_size)]


def embed_generated(
    extractor: InceptionFeatures,
    n: int,
    batch: int,
    generate: Callable[[range], Sequence[torch.Tensor]],
    progress: Callable[[int], object] = lambda k: None,
) -> list[torch.Tensor]:
    """Features [n, 2048] of each output of `generate` (e.g. one per generation step), gathered.

    `generate(chunk)` makes the chunk's images in [-1, 1], one batch per output, on the rank that
    owns the chunk; it must derive its randomness from the chunk alone.
    """
    rank, world_size = world()
    parts: list[list[torch.Tensor]] = []
    for chunk in rank_chunks(n, batch, rank, world_size):
        outputs = generate(chunk)
        parts.append([extractor(to_uint8(images)) for images in outputs])
        progress(len(chunk))
    outputs = agreed(len(parts[0]) if parts else 0, dist.ReduceOp.MAX)  # also where no chunk is owned
    local = [
        torch.cat([p[i] for p in parts]) if parts else torch.zeros(0, extractor.num_features)
        for i in range(outputs)
    ]
    return [gather_rows(rows.to(extractor.device)).cpu() for rows in local]


def split_chunks(data_cfg: Any, split: str, n: int, batch: int) -> Iterator[tuple[range, torch.Tensor]]:
    """This rank's chunks of the first n images of `split` in manifest order: (chunk, [-1, 1] images).

    The stream is read from the start (a one-process evaluation pass) and the chunks before this
    rank's are decoded and dropped: decoding costs a small fraction of embedding.
    """
    rank, world_size = world()
    mine = rank_chunks(n, batch, rank, world_size)
    if not mine:
        return
    stream = ShardStream(data_cfg, split, batch_size=batch, training=False)
    if stream.total < n:
        raise DataError(f"split {split!r} of {data_cfg.path} has {stream.total} images, fewer than N={n}")
    wanted = {chunk.start: chunk for chunk in mine}
    for index, images in enumerate(stream):
        chunk = wanted.get(index * batch)
        if chunk is not None:
            yield chunk, images[: len(chunk)]
        if index * batch >= mine[-1].start:
            return
