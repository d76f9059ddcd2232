"""http(s):// shard sets, read without credentials: the same batches as the local copy through a
server that fails about 10% of the requests, one line for a missing or private set, and make_shards
refusing to write to one. The server is moto's S3 server with a prefix anyone may read, which answers
plain HTTP GET and HEAD (ranges and ETags included) as a public bucket or a web server does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_vae.commands.make_shards import main as make_shards
from dist_vae.data.stream import DataError, ShardStream
from tests.remote_fixtures import BUCKET, FaultyProxy, id_shard_set, make_public, s3_env, upload_dir
from tests.test_data_remote import batches, cfg

PUBLIC = "public"  # the prefix of BUCKET anyone may read


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory: pytest.TempPathFactory, server: int) -> Path:
    shards = id_shard_set(tmp_path_factory.mktemp("http"), 30)
    upload_dir(server, shards, f"s3://{BUCKET}/{PUBLIC}/set")
    upload_dir(server, shards, f"s3://{BUCKET}/private/set")
    make_public(server, BUCKET, f"{PUBLIC}/")
    return shards


@pytest.fixture(autouse=True)
def no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """A web server asks for none, and none may be needed."""
    for key in s3_env(""):
        monkeypatch.delenv(key, raising=False)


def test_http_through_faults_gives_the_local_batches_reading_only(
    local_shards: Path, server: int, tmp_path: Path
) -> None:
    proxy = FaultyProxy(server, rate=0.1, seed=4)
    try:
        remote = batches(cfg(f"{proxy.url}/{BUCKET}/{PUBLIC}/set", tmp_path / "cache"), 14)
    finally:
        proxy.close()
    local = batches(cfg(local_shards, tmp_path / "unused"), 14)
    assert all(torch.equal(a, b) for a, b in zip(remote, local, strict=True))
    assert sum(proxy.faults.values()) > 0, proxy.faults
    assert {method for method, _ in proxy.requests} <= {"GET", "HEAD"}, proxy.requests


@pytest.mark.parametrize(
    ("where", "cause"),
    [(f"{PUBLIC}/elsewhere", "manifest.json is missing"),
     ("private/set", "manifest.json: access denied")],
)  # fmt: skip
def test_a_missing_or_private_set_is_one_line_naming_the_url(
    local_shards: Path, server: int, tmp_path: Path, where: str, cause: str
) -> None:
    url = f"http://127.0.0.1:{server}/{BUCKET}/{where}"
    with pytest.raises(DataError) as err:
        ShardStream(cfg(url, tmp_path), batch_size=5)
    assert str(err.value).startswith(f"{url}/{cause}") and "\n" not in str(err.value), str(err.value)


def test_make_shards_refuses_to_write_to_https(
    local_shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = "https://example.org/set"
    cli = [
        "--source",
        f"folder:{local_shards.parent / 'images'}",
        "--out",
        out,
        "--resolution",
        "8",
        "--no-progress",
    ]
    assert make_shards(cli) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"make_shards.py: error: --out {out}: https:// shard sets are read-only"), err
