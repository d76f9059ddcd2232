"""Shards read from a real S3-compatible server (moto, on 127.0.0.1) through a fault-injecting proxy:
the same batches as from the local copy, a bounded node-local cache, one line per permanent error."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from itertools import islice
from pathlib import Path

import pytest
import torch

from dist_vae.commands.make_shards import main as make_shards
from dist_vae.config import DataConfig
from dist_vae.data import storage
from dist_vae.data.cache import ShardCache
from dist_vae.data.order import SampleOrder
from dist_vae.data.storage import RemoteError, Store, StoreUnreachable
from dist_vae.data.stream import DataError, ShardStream, local_root, manifest_sha256, read_manifest
from tests.remote_fixtures import BUCKET, FaultyProxy, id_shard_set, s3_env, sampled_sizes, upload_dir

URL = f"s3://{BUCKET}/set"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory: pytest.TempPathFactory, server: int) -> Path:
    shards = id_shard_set(tmp_path_factory.mktemp("remote"), 45)
    upload_dir(server, shards, URL)
    return shards


def cfg(path: str | Path, cache: Path, **kw: object) -> DataConfig:
    base: dict = {"path": str(path), "resolution": 8, "num_workers": 2, "shuffle_group": 3,
                  "cache_dir": str(cache), "remote_retries": 6, "remote_timeout_s": 5.0}  # fmt: skip
    return DataConfig(**{**base, **kw})


def batches(c: DataConfig, n: int, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    return list(islice(ShardStream(c, rank=rank, world_size=world, seed=3, batch_size=5), n))


def largest(local: Path) -> int:
    return max(s["bytes"] for s in read_manifest(local)["splits"]["train"]["shards"])


def test_s3_through_faults_gives_the_local_batches(
    local_shards: Path, proxy: FaultyProxy, tmp_path: Path
) -> None:
    """~10% of requests fail (503, resets, bodies cut short); forked workers after the parent read the
    manifest through the store; two epochs and more."""
    remote = batches(cfg(URL, tmp_path / "cache"), 22)
    local = batches(cfg(local_shards, tmp_path / "unused"), 22)
    assert all(torch.equal(a, b) for a, b in zip(remote, local, strict=True))
    assert sum(proxy.faults.values()) > 0, proxy.faults


def test_cache_of_three_shards_never_exceeds_its_budget(
    local_shards: Path, proxy: FaultyProxy, tmp_path: Path
) -> None:
    budget = 3 * largest(local_shards)
    cache = tmp_path / "cache"
    with sampled_sizes(cache) as sizes:
        remote = batches(cfg(URL, cache, cache_bytes=budget), 22)
    local = batches(cfg(local_shards, tmp_path / "unused"), 22)
    assert all(torch.equal(a, b) for a, b in zip(remote, local, strict=True))
    assert max(sizes) <= budget and max(sizes) > 0, (max(sizes), budget)
    assert len(sizes) > 10


def test_two_ranks_of_a_node_download_each_shard_once(
    local_shards: Path, server: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = FaultyProxy(server)  # no faults: every GET of a shard is a download
    for key, value in s3_env(counting.url).items():
        monkeypatch.setenv(key, value)
    c = cfg(URL, tmp_path / "cache")
    out: dict[int, list[torch.Tensor]] = {}
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, batches(c, 12, r, 2))) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counting.close()
    gets = {
        path: n
        for (method, path), n in counting.requests.items()
        if method == "GET" and path.endswith((".tar", ".idx.json"))
    }
    shards = read_manifest(local_shards)["splits"]["train"]["shards"]
    names = [n for s in shards for n in (s["name"], s["index"]["name"])]  # indexes too: once per node
    assert sorted(gets) == sorted(f"/{BUCKET}/set/{n}" for n in names)
    assert set(gets.values()) == {1}, gets
    for r in (0, 1):
        assert all(
            torch.equal(a, b)
            for a, b in zip(out[r], batches(cfg(local_shards, tmp_path), 12, r, 2), strict=True)
        )


def test_workers_fetch_the_next_shuffle_group_before_reading_it(
    local_shards: Path, proxy: FaultyProxy, tmp_path: Path
) -> None:
    """Batches of one image, groups of one shard: after the first batch the workers have made at most
    the next few (DataLoader's prefetch: positions 0 to 4), which read the first one or two groups,
    yet the cache fills with the shards of the next group too, and no further (read-ahead: this
    group and the next)."""
    cache = tmp_path / "cache"
    batches = iter(ShardStream(cfg(URL, cache, shuffle_group=1), seed=3, batch_size=1))
    next(batches)
    shards = read_manifest(local_shards)["splits"]["train"]["shards"]
    order = SampleOrder([s["count"] for s in shards], seed=3, group=1, shuffle=True)
    sequence = [order.at(p)[1] for p in range(order.total)]
    made = set(sequence[:5])
    windows = {s for j in range(5) for s in list(dict.fromkeys(sequence[j:]))[:2]}  # two groups from j
    expected = {shards[s]["name"] for s in made | windows}
    assert len(expected) > len({shards[s]["name"] for s in made})  # read-ahead is what fetches the rest
    deadline = time.monotonic() + 30
    while not expected <= (cached := {p.name for p in cache.glob("*.tar")}) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cached == expected, (sorted(cached), sorted(expected))
    assert {p.name for p in cache.glob("*.idx.json")} == {n.replace(".tar", ".idx.json") for n in expected}
    batches.close()  # type: ignore[attr-defined]


def test_read_ahead_never_evicts_a_pinned_file(
    local_shards: Path, proxy: FaultyProxy, tmp_path: Path
) -> None:
    shards = read_manifest(local_shards)["splits"]["train"]["shards"][:3]
    cache = ShardCache(Store(URL, retries=6), tmp_path, 2 * largest(local_shards))
    cache.check(shards)
    a, b, c = (s["name"] for s in shards)
    cache.pin([a, b])
    assert cache.fetch_ahead(shards[0]) and cache.fetch_ahead(shards[1])
    assert not cache.fetch_ahead(shards[2])  # it fits only in place of a pinned file
    os.close(cache.open(shards[2]))  # a reader does evict one: the least recently used
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [b, c]
    cache.pin([])
    assert cache.fetch_ahead(shards[0])  # unpinned, b goes
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [a, c]


def test_a_budget_below_one_shard_is_refused_in_one_line(
    local_shards: Path, proxy: FaultyProxy, tmp_path: Path
) -> None:
    with pytest.raises(DataError, match=r"^data.cache_bytes=100 is smaller than the largest shard") as err:
        ShardStream(cfg(URL, tmp_path, cache_bytes=100), batch_size=5)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("url", "cause"),
    [("s3://no-such-bucket/set", "s3://no-such-bucket/set/manifest.json: no such bucket"),
     ("s3://shards/elsewhere", "s3://shards/elsewhere/manifest.json is missing")],
)  # fmt: skip
def test_permanent_errors_are_one_line_naming_the_url(
    local_shards: Path, proxy: FaultyProxy, tmp_path: Path, url: str, cause: str
) -> None:
    with pytest.raises(DataError) as err:
        ShardStream(cfg(url, tmp_path), batch_size=5)
    assert str(err.value).startswith(cause) and "\n" not in str(err.value), str(err.value)


def test_a_replaced_object_is_an_error_naming_it(
    local_shards: Path, server: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3_env(f"http://127.0.0.1:{server}").items():
        monkeypatch.setenv(key, value)
    store = Store("s3://shards/replaced")
    store.write("x.tar", b"one")
    etag = store.download("x.tar", tmp_path / "a")
    store.write("x.tar", b"two")
    with pytest.raises(RemoteError, match=r"^s3://shards/replaced/x.tar: the object changed during the run"):
        store.download("x.tar", tmp_path / "b", etag)


def test_retries_are_counted_and_bounded(
    server: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    flaky = FaultyProxy(server, rate=1.0, seed=2, max_in_a_row=10**9)
    for key, value in s3_env(flaky.url).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(storage, "BACKOFF_S", 0.001)
    before = storage.counters["retries"]
    with pytest.raises(
        StoreUnreachable, match=r"^s3://shards/set/manifest.json: object store unreachable after 3 retries"
    ):
        Store(URL, retries=3, deadline_s=2).read("manifest.json")
    assert storage.counters["retries"] - before == 3
    flaky.close()


def test_a_store_down_mid_stream_reaches_the_main_process_as_unreachable(
    local_shards: Path, proxy: FaultyProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a DataLoader worker (forked after the backoff was shortened here), as its own type: the
    trainer checkpoints and exits 6 on it, where another DataError is a refusal."""
    monkeypatch.setattr(storage, "BACKOFF_S", 0.001)
    # A cache of three shards: read-ahead cannot have the whole split before the store goes down.
    data = cfg(URL, tmp_path / "cache", remote_retries=2, cache_bytes=3 * largest(local_shards))
    stream = iter(ShardStream(data, seed=3, batch_size=5))
    next(stream)
    proxy.down = True
    with pytest.raises(
        StoreUnreachable, match=r"^s3://shards/set/\S+: object store unreachable after 2 retries"
    ):
        for _ in range(20):  # two epochs: the shards evicted meanwhile are needed again
            next(stream)
    assert proxy.refused > 0


def test_no_client_is_inherited_across_fork(server: int, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3_env(f"http://127.0.0.1:{server}").items():
        monkeypatch.setenv(key, value)
    store = Store("s3://shards/fork")
    store.write("a", b"x")
    pid = os.fork()
    if pid == 0:  # the child makes its own client and reads
        os._exit(0 if store.read("a") == b"x" else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert dataclasses.replace(store).read("a") == b"x"


def test_three_parts_on_their_own_stages_and_the_finish_upload_what_one_process_builds(
    local_shards: Path,
    server: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key, value in s3_env(f"http://127.0.0.1:{server}").items():
        monkeypatch.setenv(key, value)
    url = "s3://shards/parts"
    cli = ["--source", f"folder:{local_shards.parent / 'images'}", "--out", url, "--resolution", "8",
           "--format", "png", "--shard-size", "7", "--val-fraction", "0", "--no-progress"]  # fmt: skip
    for i in (0, 2):  # each part as on a machine of its own: a stage of its own
        assert make_shards([*cli, "--part", f"{i}/3", "--stage", str(tmp_path / str(i))]) == 0
    capsys.readouterr()
    assert make_shards([*cli, "--finish", "3"]) == 2
    assert capsys.readouterr().err.startswith(f"make_shards.py: error: {url}: part(s) 1/3 not finished")
    assert make_shards([*cli, "--part", "1/3", "--stage", str(tmp_path / "1")]) == 0
    assert make_shards([*cli, "--finish", "3"]) == 0
    store = Store(url)
    names = [p.name for p in local_shards.iterdir() if p.is_file() and not p.name.startswith(".")]
    assert "manifest.json" in names and all(store.read(n) == (local_shards / n).read_bytes() for n in names)
    for i in range(3):  # the finish removed the parts' records
        with pytest.raises(storage.NoSuchObject):
            store.head(f".progress/part-{i}-of-3.json")


def test_files_derived_from_a_remote_set_live_in_its_local_cache(
    local_shards: Path, proxy: FaultyProxy, tmp_path: Path
) -> None:
    """The FID reference cache: keyed by the manifest's sha256, kept beside the cached shards."""
    remote = cfg(URL, tmp_path / "cache")
    assert manifest_sha256(remote) == manifest_sha256(cfg(local_shards, tmp_path))
    assert (
        local_root(remote) == tmp_path / "cache" and local_root(cfg(local_shards, tmp_path)) == local_shards
    )
