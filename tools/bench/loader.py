"""Loader benchmark (a script, not a test): the same images at 256 px, side by side.

(a) ShardStream over the shards, one DataLoader worker; (a2) the same with two workers; (ad), (a2d)
the same with the stream given a device (the meta device here), as a GPU trainer uses it: the main
process only receives the uint8 batches and the scaling to [-1, 1] is the device's work, so these
measure the workers alone; in (a) and (a2) the main process scales on the CPU, on the same cores;
(b) LSUN LMDB random access as torchvision's LSUN dataset does it (lmdb get + PIL decode + resize
shorter side + centre crop, shuffled map-style DataLoader, one worker); (c) PIL decode of the shard
bytes to RGB arrays alone, in one process (the ceiling for one worker of (a)); make_shards with 2
workers against 1. Every round times each of them once, back to back, and each ratio printed is the
median over rounds of that round's ratio: a shared machine's throughput drifts over tens of
seconds, so the two sides of a ratio are best measured within one round (taking each loader's best
round instead would pair maxima from different minutes).

    PYTHONPATH=. python tools/bench/loader.py --images 500
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lmdb
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dist_vae.config import DataConfig
from dist_vae.data.decode import decode
from dist_vae.data.demo import build_demo_lmdb
from dist_vae.data.shards import ShardSettings, build_shards
from dist_vae.data.sources import LmdbSource
from dist_vae.data.stream import ShardStream
from tools.bench.steal import StealMeter


class LsunRandomAccess(Dataset):
    """torchvision.datasets.LSUN's access pattern, with the LMDB opened per worker process."""

    def __init__(self, path: Path, keys: list[str], resolution: int) -> None:
        self.path, self.keys, self.resolution = path, keys, resolution
        self.env: lmdb.Environment | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.env is None:
            self.env = lmdb.open(str(self.path), readonly=True, lock=False, readahead=False, meminit=False)
        with self.env.begin() as txn:
            data = txn.get(self.keys[index].encode())
        img = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = img.size
        scale = self.resolution / min(w, h)
        img = img.resize((max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale))))
        left, top = (img.size[0] - self.resolution) // 2, (img.size[1] - self.resolution) // 2
        img = img.crop((left, top, left + self.resolution, top + self.resolution))
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def timed(fn: Callable[[], int]) -> float:
    """Images per second of one call of `fn`, which returns how many images it produced."""
    start = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - start)


def steady(batches: Iterator[torch.Tensor], n: int) -> float:
    """Images per second over `n` batches after the first (worker start-up is not throughput)."""
    next(batches)
    start = time.perf_counter()
    images = sum(next(batches).shape[0] for _ in range(n))
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    args = parser.parse_args()
    steal = StealMeter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        lmdb_path = work / "lsun_like_lmdb"
        if not (lmdb_path / "data.mdb").is_file():
            build_demo_lmdb(lmdb_path, args.images, seed=0, short_side=args.resolution)
        shard_size = max(1, args.images // 8)

        def shard(out: str, workers: int) -> int:
            shutil.rmtree(work / out, ignore_errors=True)  # a finished shard set would only be checked
            settings = ShardSettings(
                source=f"lmdb:{lmdb_path}",
                resolution=args.resolution,
                shard_size=shard_size,
                val_fraction=0.0,
            )
            manifest = build_shards(settings, work / out, workers=workers, progress=False)
            return manifest["splits"]["train"]["count"]

        shard("shards_w1", 1)
        shards = work / "shards_w1"
        keys = LmdbSource(lmdb_path, work / ".cache").keys()
        encoded = []
        for path in sorted(shards.glob("train-*.tar")):
            with tarfile.open(path) as tar:
                encoded += [tar.extractfile(m).read() for m in tar if m.name.endswith(".webp")]  # type: ignore[union-attr]

        def stream(workers: int, device: torch.device | None = None) -> float:
            cfg = DataConfig(path=str(shards), resolution=args.resolution, num_workers=workers)
            s = ShardStream(cfg, "train", seed=0, batch_size=args.batch_size, device=device)
            return steady(iter(s), 2 * (s.samples_per_epoch // args.batch_size) - 1)

        def lmdb_random() -> float:
            loader = DataLoader(
                LsunRandomAccess(lmdb_path, keys, args.resolution),
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=1,
                drop_last=True,
                persistent_workers=True,
                generator=torch.Generator().manual_seed(0),
            )
            two_epochs = (batch for _ in range(2) for batch in loader)
            return steady(two_epochs, 2 * len(loader) - 1)

        def decode_only() -> float:
            def decode_all() -> int:
                for data in encoded:
                    decode(data, "WEBP", args.resolution)
                return len(encoded)

            return timed(decode_all)

        meta = torch.device("meta")
        loaders = {
            "a": lambda: stream(1),
            "a2": lambda: stream(2),
            "ad": lambda: stream(1, meta),
            "a2d": lambda: stream(2, meta),
            "b": lmdb_random,
            "c": decode_only,
            "s1": lambda: timed(lambda: shard("shards_1", 1)),
            "s2": lambda: timed(lambda: shard("shards_2", 2)),
        }
        runs: dict[str, list[float]] = {name: [] for name in loaders}
        for _ in range(args.rounds):
            for name, fn in loaders.items():
                runs[name].append(fn())

    def ratio(x: str, y: str) -> float:
        return statistics.median(a / b for a, b in zip(runs[x], runs[y], strict=True))

    print(f"{len(encoded)} images at {args.resolution} px, batch {args.batch_size}, {args.rounds} rounds: "
          "medians over rounds")  # fmt: skip
    rows = [
        ("a", "ShardStream, 1 worker"),
        ("a2", "ShardStream, 2 workers"),
        ("ad", "ShardStream, 1 worker, scaled on the device"),
        ("a2d", "ShardStream, 2 workers, scaled on the device"),
        ("b", "LSUN LMDB random access, 1 worker"),
        ("c", "PIL decode of shard bytes, in process"),
    ]
    for name, what in rows:
        print(f"({name}) {what:<46}{statistics.median(runs[name]):8.1f} img/s")
    for a, a2, consumer in [("ad", "a2d", "the workers alone"), ("a", "a2", "with the CPU consumer")]:
        print(f"{a}/b = {ratio(a, 'b'):.2f}   (target >= 1.5; {consumer})")
        print(f"{a}/c = {ratio(a, 'c'):.2f}   (target >= 0.8; {consumer})")
        print(f"{a2}/{a} = {ratio(a2, a):.2f}  (target >= 1.8; {consumer})")
    print(f"make_shards: 1 worker {statistics.median(runs['s1']):.1f} img/s, "
          f"2 workers {statistics.median(runs['s2']):.1f} img/s")  # fmt: skip
    print(f"make_shards 2 workers / 1 worker = {ratio('s2', 's1'):.2f}   (target >= 1.8)")
    print(steal.line())


if __name__ == "__main__":
    main()
