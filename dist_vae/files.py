"""The one way this project writes a file: to a temporary sibling, fsync'd, then renamed over the target.

A crash, a kill -9 or a full disk at any moment leaves either the old content or the new, never a
torn file, and the temporary is removed when the write fails. Data, checkpoints, logs and tools all
write through here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

_NONCE = uuid.uuid4().hex[:8]


def process_tag() -> str:
    """HOST-PID-RANDOM: unique to this process, also across the nodes of a shared filesystem, for the
    names of its temporaries (two writers never share one)."""
    return f"{socket.gethostname()}-{os.getpid()}-{_NONCE}"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (shards and checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write; on success it is fsync'd and renamed over `path`.

    The temporary may be a file or a directory (an LMDB environment); either is removed on failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{process_tag()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        else:
            tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_synced(path: Path, data: bytes) -> None:
    """Write `path` in place and fsync it: for files inside a temporary directory that is then
    published as a whole by `replace_dir` (the directory rename is the atomic step)."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the finished directory `tmp` to `final` durably; an existing `final` is moved aside
    first and removed only once the new one is in place."""
    aside = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    fsync_dir(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call `write` on a binary file that replaces `path` only once it is complete and on disk."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def save_png_atomic(grid: np.ndarray, path: Path) -> None:
    """A uint8 HWC array as a PNG file."""
    write_atomic(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as the uint8 pixels a PNG of them holds (what FID's network sees too)."""
    import torch  # here, not at the top: make_shards writes through this module and needs no torch

    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_grid(rows: Sequence[torch.Tensor], pad: int = 2) -> np.ndarray:
    """Tile images into one uint8 HWC array: one row per tensor [n,3,R,R] in [-1,1]."""
    if not rows:
        raise ValueError("image_grid needs at least one row of images")
    n, c, h, w = rows[0].shape
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), 255, dtype=np.uint8)
    for r, images in enumerate(rows):
        if images.shape != rows[0].shape:
            raise ValueError(f"row {r} has shape {tuple(images.shape)}, row 0 has {(n, c, h, w)}")
        pixels = to_uint8(images).cpu().numpy()
        for i in range(n):
            y, x = pad + r * (h + pad), pad + i * (w + pad)
            grid[y : y + h, x : x + w] = pixels[i].transpose(1, 2, 0)
    return grid
