"""ShardStream on real shards with real DataLoader worker processes."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch

import dist_vae.data.stream as stream_module
from dist_vae.config import DataConfig
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
    base: dict = {
        "path": str(shard_dir),
        "resolution": 8,
        "batch_size": 4,
        "num_workers": 2,
        "shuffle_buffer": 8,
    }
    return DataConfig(**{**base, **kw})


def ids(batch: torch.Tensor) -> list[int]:
    return torch.round((batch[:, 0, 0, 0] + 1) * 127.5).long().tolist()


def flipped(batch: torch.Tensor) -> list[bool]:
    return (batch[:, 1, 1, 0] > batch[:, 1, 1, -1]).tolist()


def take(stream: ShardStream, n: int) -> list[torch.Tensor]:
    return list(islice(stream, n))


def test_uneven_shards(shard_dir: Path) -> None:
    counts = [s["count"] for s in read_manifest(shard_dir)["splits"]["train"]["shards"]]
    assert sorted(counts) == [3, 7, 7, 7, 7, 7, 7]


def test_two_ranks_two_workers_disjoint_with_equal_batch_counts(shard_dir: Path) -> None:
    cfg = config(shard_dir)
    streams = [ShardStream(cfg, "train", rank, 2, seed=5) for rank in (0, 1)]
    bpe = streams[0].batches_per_epoch
    assert bpe == streams[1].batches_per_epoch == N_IMAGES // (2 * 4)
    batches = [take(s, 2 * bpe) for s in streams]
    epochs = []
    for epoch in range(2):
        per_rank = [[i for b in batches[r][epoch * bpe : (epoch + 1) * bpe] for i in ids(b)] for r in (0, 1)]
        assert all(len(p) == bpe * 4 == len(set(p)) for p in per_rank)
        assert not set(per_rank[0]) & set(per_rank[1])
        assert set(per_rank[0]) | set(per_rank[1]) <= set(range(N_IMAGES))
        epochs.append(per_rank)
    assert epochs[0] != epochs[1]  # each epoch is reshuffled
    assert all(s.state_dict()["epoch"] == 2 and s.state_dict()["batch"] == 0 for s in streams)
    flips = [f for rank_batches in batches for b in rank_batches for f in flipped(b)]
    assert 0.2 < sum(flips) / len(flips) < 0.8


def test_evaluation_pass_covers_the_split_once_with_equal_counts(shard_dir: Path) -> None:
    cfg = config(shard_dir, batch_size=4)
    per_rank = [list(ShardStream(cfg, "train", rank, 2, training=False)) for rank in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 6  # ceil(45 / 8)
    seen = Counter(i for batches in per_rank for b in batches for i in ids(b))
    assert seen == Counter(range(N_IMAGES))
    assert all(b.shape[0] <= 4 for batches in per_rank for b in batches)
    assert not any(f for batches in per_rank for b in batches for f in flipped(b))
    again = list(ShardStream(cfg, "train", 0, 2, training=False))
    assert all(torch.equal(a, b) for a, b in zip(again, per_rank[0], strict=True))


@pytest.mark.parametrize(("num_workers", "stops"), [(2, (3, 11, 12)), (0, (7,))])
def test_resume_continues_exactly(shard_dir: Path, num_workers: int, stops: tuple[int, ...]) -> None:
    cfg = config(shard_dir, num_workers=num_workers)
    reference = take(ShardStream(cfg, seed=9), 26)  # 11 batches per epoch: crosses two epoch boundaries
    assert ShardStream(cfg, seed=9).batches_per_epoch == 11
    assert not all(
        torch.equal(a, b) for a, b in zip(reference, take(ShardStream(cfg, seed=10), 26), strict=True)
    )
    for stop in stops:
        first = ShardStream(cfg, seed=9)
        head = take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))
        assert state["samples"] == (stop % 11) * 4 and state["epoch"] == stop // 11
        second = ShardStream(cfg, seed=9)
        second.load_state_dict(state)
        tail = take(second, 26 - stop)
        assert all(torch.equal(a, b) for a, b in zip(head + tail, reference, strict=True)), stop


def test_resume_skips_without_decoding(shard_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = []
    real_decode = stream_module._decode
    monkeypatch.setattr(stream_module, "_decode", lambda *a: decoded.append(1) or real_decode(*a))
    cfg = config(shard_dir, num_workers=0)
    stream = ShardStream(cfg, seed=2)
    stream.load_state_dict({**stream.state_dict(), "batch": 9})
    take(stream, 1)
    assert len(decoded) == 4


def test_state_from_another_setup_is_refused(shard_dir: Path) -> None:
    state = ShardStream(config(shard_dir)).state_dict()
    with pytest.raises(DataError, match="batch_size=4 but this stream has 8"):
        ShardStream(config(shard_dir, batch_size=8)).load_state_dict(state)
    with pytest.raises(DataError, match="world_size=1 but this stream has 2"):
        ShardStream(config(shard_dir), rank=1, world_size=2).load_state_dict(state)


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete"])
def test_bad_shard_is_skipped_counted_and_batch_count_kept(
    shard_dir: Path, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    victim = copy / "train-000002.tar"
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        victim.write_bytes(data[:600] + bytes([data[600] ^ 1]) + data[601:])
    else:
        victim.unlink()
    stream = ShardStream(config(copy), seed=4)
    with caplog.at_level(logging.WARNING, logger="dist_vae.data.stream"):
        batches = take(stream, stream.batches_per_epoch)
    assert len(batches) == 11 and all(b.shape == (4, 3, 8, 8) for b in batches)
    assert stream.skipped_shards == 1
    assert "train-000002.tar" in caplog.text
    per_epoch = [i for b in batches for i in ids(b)]
    assert len(per_epoch) == 44


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
        ShardStream(config(shard_dir, resolution=16))
    with pytest.raises(DataError, match="val"):
        ShardStream(config(shard_dir), split="val")  # made with val_fraction 0: empty
    with pytest.raises(DataError, match="no split 'test'"):
        ShardStream(config(shard_dir), split="test")
    with pytest.raises(DataError, match="too few for world_size 4 x batch_size 16"):
        ShardStream(config(shard_dir, batch_size=16), rank=0, world_size=4)


def test_lower_resolution_is_resized(shard_dir: Path) -> None:
    batch = next(iter(ShardStream(config(shard_dir, resolution=4, num_workers=0))))
    assert batch.shape == (4, 3, 4, 4) and batch.min() >= -1 and batch.max() <= 1
