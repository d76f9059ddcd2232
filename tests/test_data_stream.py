"""ShardStream on real shards with real DataLoader worker processes."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from itertools import islice
from pathlib import Path

import pytest
import torch

from dist_vae.config import DataConfig
from dist_vae.data.buffers import SLOTS_PER_WORKER, BatchBuffers
from dist_vae.data.shards import ShardSettings, build_shards
from dist_vae.data.stream import DataError, ShardStream, read_manifest
from tests.data_fixtures import id_images

N_IMAGES = 45  # shards of 7: six full ones and one of 3


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stream")
    id_images(root / "images", N_IMAGES)
    settings = ShardSettings(
        source=f"folder:{root / 'images'}", resolution=8, format="png", shard_size=7, val_fraction=0.0
    )
    build_shards(settings, root / "shards", progress=False)
    return root / "shards"


def config(shard_dir: Path, **kw: object) -> DataConfig:
    base: dict = {"path": str(shard_dir), "resolution": 8, "num_workers": 2, "shuffle_group": 3}
    return DataConfig(**{**base, **kw})


def ids(batch: torch.Tensor) -> list[int]:
    return torch.round((batch[:, 0, 0, 0] + 1) * 127.5).long().tolist()


def flipped(batch: torch.Tensor) -> list[bool]:
    return (batch[:, 1, 1, 0] > batch[:, 1, 1, -1]).tolist()


def take(stream: ShardStream, n: int) -> list:
    return list(islice(stream, n))


def reference(cfg: DataConfig, n: int, seed: int = 9) -> torch.Tensor:
    """The first n images of the sample sequence, indexed by global position (one rank, no workers)."""
    stream = ShardStream(dataclasses.replace(cfg, num_workers=0), seed=seed, batch_size=5)
    return torch.cat(take(stream, -(-n // 5)))[:n]


def test_uneven_shards(shard_dir: Path) -> None:
    counts = [s["count"] for s in read_manifest(shard_dir)["splits"]["train"]["shards"]]
    assert sorted(counts) == [3, 7, 7, 7, 7, 7, 7]


def test_epochs_are_permutations_and_workers_do_not_matter(shard_dir: Path) -> None:
    ref = reference(config(shard_dir), 3 * N_IMAGES)
    epochs = [ids(ref[e * N_IMAGES : (e + 1) * N_IMAGES]) for e in range(3)]
    assert all(sorted(e) == list(range(N_IMAGES)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] != list(range(N_IMAGES))
    flips = flipped(ref)
    assert 0.25 < sum(flips) / len(flips) < 0.75
    for workers in (1, 2):
        stream = ShardStream(config(shard_dir, num_workers=workers), seed=9, batch_size=5)
        assert torch.equal(torch.cat(take(stream, 27)), ref)
        assert stream.position == 3 * N_IMAGES
    other = ShardStream(config(shard_dir), seed=10, batch_size=5)
    assert ids(torch.cat(take(other, 9))) != epochs[0]


def test_resume_on_other_world_size_batch_size_and_workers(shard_dir: Path) -> None:
    """Every rank's batch k is exactly the slice of the one global sequence its position names."""
    ref = reference(config(shard_dir), 150)
    world, batch = 2, 3
    streams = [
        ShardStream(config(shard_dir, num_workers=2), "train", r, world, seed=9, batch_size=batch)
        for r in range(world)
    ]
    for r, stream in enumerate(streams):
        for k, images in enumerate(take(stream, 7)):
            start = k * world * batch + r * batch
            assert torch.equal(images, ref[start : start + batch]), (r, k)
    states = [json.loads(json.dumps(s.state_dict())) for s in streams]
    assert states[0] == states[1] == {"version": 2, "position": 42, "seed": 9, "split": "train", "total": 45}
    for world, batch, workers in [(3, 4, 1), (1, 7, 0)]:
        for r in range(world):
            cfg = config(shard_dir, num_workers=workers)
            stream = ShardStream(cfg, "train", r, world, 9, batch_size=batch)
            stream.load_state_dict(states[0])
            for k, images in enumerate(take(stream, 3)):
                start = 42 + k * world * batch + r * batch
                assert torch.equal(images, ref[start : start + batch]), (world, r, k)
            assert stream.position == 42 + 3 * world * batch


def test_with_keys_names_the_samples(shard_dir: Path) -> None:
    stream = ShardStream(config(shard_dir, num_workers=0), batch_size=9, with_keys=True)
    pairs = take(stream, 5)
    keys = [k for _, batch_keys in pairs for k in batch_keys]
    assert len(keys) == len(set(keys)) == N_IMAGES
    for images, batch_keys in pairs:  # keys are the source keys: class{i % 3}/img{i:03d}.png
        assert [int(k.split("img")[1][:3]) for k in batch_keys] == ids(images)


def test_evaluation_pass_covers_the_split_once(shard_dir: Path) -> None:
    cfg = config(shard_dir)
    streams = [ShardStream(cfg, "train", r, 2, batch_size=4, training=False, with_keys=True) for r in (0, 1)]
    assert [len(s) for s in streams] == [6, 6]  # 23 and 22 images (`share`): 5 batches of 4 and one smaller
    per_rank = [take(s, 10) for s in streams]
    assert [[b.shape[0] for b, _ in batches] for batches in per_rank] == [[4] * 5 + [3], [4] * 5 + [2]]
    seen = [i for batches in per_rank for b, _ in batches for i in ids(b)]
    assert sorted(seen) == list(range(N_IMAGES)) and len(seen) == N_IMAGES
    assert not any(f for batches in per_rank for b, _ in batches for f in flipped(b))
    with pytest.raises(DataError, match="always starts its pass"):
        streams[0].load_state_dict(streams[0].state_dict())


def test_small_and_empty_eval_splits_do_not_refuse(shard_dir: Path, tmp_path: Path) -> None:
    empty = ShardStream(config(shard_dir), "val", batch_size=4, training=False)  # val_fraction 0
    assert len(empty) == 0 and list(empty) == [] and empty.total == 0
    streams = [ShardStream(config(shard_dir), "train", r, 4, batch_size=64, training=False) for r in range(4)]
    assert [len(s) for s in streams] == [1, 1, 1, 1]
    assert sum(b.shape[0] for s in streams for b in s) == N_IMAGES
    with pytest.raises(DataError, match=r"split 'train' .* has 45 images: .* world_size 4 x batch_size 12"):
        ShardStream(config(shard_dir), rank=0, world_size=4, batch_size=12)


def test_state_checks_name_the_key(shard_dir: Path) -> None:
    state = ShardStream(config(shard_dir), seed=3, batch_size=4).state_dict()
    with pytest.raises(DataError, match="seed=3 but this stream has 4"):
        ShardStream(config(shard_dir), seed=4, batch_size=4).load_state_dict(state)
    with pytest.raises(DataError, match="total=44 but this stream has 45"):
        ShardStream(config(shard_dir), seed=3, batch_size=4).load_state_dict({**state, "total": 44})
    with pytest.raises(DataError, match="position -1"):
        ShardStream(config(shard_dir), seed=3, batch_size=4).load_state_dict({**state, "position": -1})
    old = {"version": 1, "epoch": 0, "batch": 3, "samples": 12, "seed": 3, "split": "train"}
    with pytest.raises(DataError, match="state version 1 is not 2"):
        ShardStream(config(shard_dir), seed=3, batch_size=4).load_state_dict(old)


def damaged_copy(shard_dir: Path, tmp_path: Path, damage: str) -> tuple[Path, int]:
    """A copy with train-000002.tar damaged; returns it and how many of that shard's images are lost."""
    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    victim = copy / "train-000002.tar"
    data = victim.read_bytes()
    records = json.loads((copy / "train-000002.idx.json").read_text())["samples"]
    if damage == "flip_byte":
        at = records[3][2] + records[3][3] // 2  # inside the 4th image's data
        victim.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :])
        return copy, 1
    if damage == "truncate":
        cut = records[4][2] + 10
        victim.write_bytes(data[:cut])
        return copy, len(records) - 4
    if damage == "bad_index":
        (copy / "train-000002.idx.json").write_text("[]")
    else:
        victim.unlink()
    return copy, len(records)


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete", "bad_index"])
def test_bad_samples_are_replaced_counted_and_batches_kept(
    shard_dir: Path, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    copy, lost = damaged_copy(shard_dir, tmp_path, damage)
    results = {}
    for workers in (0, 1, 2):
        stream = ShardStream(config(copy, num_workers=workers), seed=4, batch_size=5, with_keys=True)
        with caplog.at_level(logging.WARNING, logger="dist_vae.data.stream"):
            pairs = take(stream, 9)  # exactly one epoch
        assert [b.shape for b, _ in pairs] == [(5, 3, 8, 8)] * 9
        assert stream.skipped == {"shards": 1, "samples": lost}
        results[workers] = pairs
    assert "train-000002.tar" in caplog.text
    keys = [k for _, batch_keys in results[0] for k in batch_keys]
    assert len(keys) - len(set(keys)) == lost  # substitutes are other samples, seen twice
    assert len(set(keys)) == N_IMAGES - lost
    for workers in (1, 2):
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(results[0], results[workers], strict=True))
    one_rank = torch.cat([images for images, _ in results[0]])
    for rank in (0, 1):  # two ranks see the same substitutes at the same positions
        stream = ShardStream(config(copy, num_workers=0), "train", rank, 2, seed=4, batch_size=5)
        for k, images in enumerate(take(stream, 4)):
            start = k * 10 + rank * 5
            assert torch.equal(images, one_rank[start : start + 5])


@pytest.mark.parametrize("workers", [0, 2])
def test_nothing_readable_raises_with_the_reasons(shard_dir: Path, tmp_path: Path, workers: int) -> None:
    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    for tar in copy.glob("*.tar"):
        tar.unlink()
    stream = ShardStream(config(copy, num_workers=workers), batch_size=4)
    missing = r"left in split 'train' .*\(train-000000.tar: unreadable \(No such file or directory\); train-0"
    with pytest.raises(DataError, match=missing) as caught:
        next(iter(stream))
    assert "\n" not in str(caught.value)  # one line, also from a worker process


def test_shards_without_index_still_stream_with_one_warning(
    shard_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = tmp_path / "old"
    shutil.copytree(shard_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        (copy / shard.pop("index")["name"]).unlink()
    (copy / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    with caplog.at_level(logging.WARNING, logger="dist_vae.data.stream"):
        streams = [ShardStream(config(copy), seed=9, batch_size=5) for _ in range(2)]
    assert caplog.text.count("without per-sample indexes") == 1
    assert torch.equal(torch.cat(take(streams[0], 9)), reference(config(shard_dir), N_IMAGES))


def test_bad_directories_and_settings_are_named(shard_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere/manifest.json is missing.*make_shards"):
        read_manifest(tmp_path / "nowhere")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest\.json is not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(
        json.dumps({"resolution": 8, "format": "png", "splits": {"train": {"shards": [{}]}}})
    )
    with pytest.raises(DataError, match=r"splits.train.shards\[0\]"):
        read_manifest(tmp_path)
    with pytest.raises(DataError, match=r"data\.resolution=16 but the shards .* are 8 px"):
        ShardStream(config(shard_dir, resolution=16), batch_size=4)
    with pytest.raises(DataError, match="no split 'test'"):
        ShardStream(config(shard_dir), split="test", batch_size=4)


def test_lower_resolution_is_resized(shard_dir: Path) -> None:
    batch = next(iter(ShardStream(config(shard_dir, resolution=4, num_workers=0), batch_size=4)))
    assert batch.shape == (4, 3, 4, 4) and batch.min() >= -1 and batch.max() <= 1


def test_worker_buffers_are_refilled_only_after_release() -> None:
    """The shared-memory ring behind a worker's batches (buffers.BatchBuffers), in one process."""
    buffers = BatchBuffers(workers=2)
    shape = (5, 3, 8, 8)
    taken = [buffers.take(1, shape) for _ in range(SLOTS_PER_WORKER)]
    slots = [slot for slot, _ in taken]
    assert slots == list(range(SLOTS_PER_WORKER, 2 * SLOTS_PER_WORKER))  # lane 1's own slots
    assert all(b.is_shared() and b.shape == shape for _, b in taken)
    slot, fresh = buffers.take(1, shape)  # none released: a fresh buffer, never one in use
    assert slot == -1 and all(fresh.data_ptr() != b.data_ptr() for _, b in taken)
    buffers.release(slots[2])
    slot, again = buffers.take(1, shape)
    assert slot == slots[2] and again.data_ptr() == taken[2][1].data_ptr()
    buffers.release(slots[0])
    slot, smaller = buffers.take(1, (2, 3, 8, 8))  # a short last batch gets a buffer of its size
    assert slot == slots[0] and smaller.shape == (2, 3, 8, 8)
    assert buffers.take(0, shape)[0] == 0  # lane 0's slots were never touched
