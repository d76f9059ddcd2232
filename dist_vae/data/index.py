"""Per-shard sample indexes and the reader that uses them: one image read by offset, checked alone.

make_shards writes beside each `NAME.tar` a sidecar `NAME.idx.json` listing, per sample, its source
key, tar member, data offset, size and sha256; the manifest records each sidecar's size and sha256.
A reader then preads one image and checks its hash, so a flipped byte costs one image and a
truncated shard only the images past its end. Shard directories made before indexes existed (no
`index` in the manifest entry) are indexed from their tar headers and checked by decoding alone.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

from dist_vae.data.cache import BadShard, ShardCache
from dist_vae.data.sources import IMAGE_SUFFIXES
from dist_vae.data.storage import NoSuchObject, Store, is_url, join
from dist_vae.errors import DataError

PIL_FORMATS = {"webp": "WEBP", "png": "PNG", "jpg": "JPEG"}  # manifest format -> the one decoder to try
INDEX_VERSION = 1
OPEN_SHARDS = 64  # index + file descriptor kept per shard, per worker


class BadSample(Exception):
    """A sample that cannot be used; `shard` names its shard and the message says why."""

    def __init__(self, shard: str, why: str) -> None:
        super().__init__(why)
        self.shard, self.why = shard, why


def index_name(shard_name: str) -> str:
    return shard_name.removesuffix(".tar") + ".idx.json"


def read_manifest(directory: str | Path, store: Store | None = None) -> dict[str, Any]:
    """The shard set's manifest.json, checked for the fields the stream relies on; `directory` is a
    local directory or an object-store URL (read through `store`, by default one for the URL)."""
    path: Path | str
    if is_url(directory):
        store = store or Store(str(directory))
        path = join(directory, "manifest.json")
        try:
            text = store.read("manifest.json").decode()
        except NoSuchObject as exc:
            if "no such bucket" not in str(exc):
                raise DataError(
                    f"{path} is missing: build shards with tools/make_shards.py --out {directory}"
                ) from exc
            raise
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not valid JSON: {exc}") from exc
    else:
        path = Path(directory) / "manifest.json"
        if not path.is_file():
            raise DataError(_no_manifest(Path(directory)))
        text = path.read_text()
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise DataError(f"{path} is not a shard manifest: expected {what}")

    need(isinstance(manifest, dict), "a JSON object")
    need(isinstance(manifest.get("resolution"), int), "an integer 'resolution'")
    need(manifest.get("format") in PIL_FORMATS, f"a 'format' among {sorted(PIL_FORMATS)}")
    need(isinstance(manifest.get("splits"), dict), "a 'splits' object")
    for split, body in manifest["splits"].items():
        need(
            isinstance(body, dict) and isinstance(body.get("shards"), list), f"a list 'splits.{split}.shards'"
        )
        for i, shard in enumerate(body["shards"]):
            fields = {"name": str, "count": int}
            index = shard.get("index") if isinstance(shard, dict) else None
            need(
                isinstance(shard, dict)
                and all(isinstance(shard.get(k), t) for k, t in fields.items())
                and (index is None or {"name", "bytes", "sha256"} <= set(index)),
                f"'splits.{split}.shards[{i}]' with name, count and (optionally) index name/bytes/sha256",
            )
    return manifest


def _no_manifest(directory: Path) -> str:
    """Why `directory` has no manifest, as one line saying what to run: it holds raw images or an
    LMDB (shards go to another directory), an unfinished make_shards run, or nothing of ours."""
    new = "--out NEW_DIR (another directory), then set data.path to NEW_DIR"
    if (directory / "data.mdb").is_file():
        return (
            f"{directory} holds an LMDB, not shards: build them with tools/make_shards.py "
            f"--source lmdb:{directory} {new}"
        )
    if (directory / ".progress").is_dir():
        return (
            f"{directory} holds an unfinished make_shards run: run the same make_shards command to finish it"
        )
    if directory.is_dir():
        first = itertools.islice(directory.rglob("*"), 10_000)  # a look, not a listing of millions
        if any(p.suffix.lower() in IMAGE_SUFFIXES for p in first):
            return (
                f"{directory} holds image files, not shards: build them with tools/make_shards.py "
                f"--source folder:{directory} {new}"
            )
    return (
        f"{directory / 'manifest.json'} is missing: build shards with tools/make_shards.py --out {directory}"
    )


def index_tar(path: Path, hashes: bool) -> list[list[Any]]:
    """[key, member, offset, size, sha256 or None] per image of a tar, in order (keys from KEY.json)."""
    keys: dict[str, str] = {}
    images = []
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            stem, _, ext = member.name.rpartition(".")
            if not member.isfile():
                continue
            if ext == "json":
                keys[stem] = json.loads(tar.extractfile(member).read())["key"]  # type: ignore[union-attr]
            elif ext in PIL_FORMATS:
                images.append((stem, member))
        records = []
        for stem, member in images:
            sha = None
            if hashes:
                f.seek(member.offset_data)
                sha = hashlib.sha256(f.read(member.size)).hexdigest()
            records.append([keys.get(stem, stem), member.name, member.offset_data, member.size, sha])
    return records


def index_document(shard_name: str, records: list[list[Any]]) -> bytes:
    """The sidecar's bytes for a shard's records."""
    body = {"version": INDEX_VERSION, "shard": shard_name, "fields": ["key", "member", "offset", "size",
            "sha256"], "samples": records}  # fmt: skip
    return (json.dumps(body, separators=(",", ":")) + "\n").encode()


class ShardReader:
    """One process's reader of a split's samples: sidecar indexes and open files, LRU-cached.

    Created in the process that reads (a DataLoader worker), never inherited across fork.
    """

    def __init__(
        self, directory: Path | str, shards: list[dict[str, Any]], cache: ShardCache | None = None
    ) -> None:
        self.directory, self.shards, self.cache = directory, shards, cache
        self._open: OrderedDict[int, tuple[int, list[list[Any]]]] = OrderedDict()
        self.bad_shards: dict[int, str] = {}  # shard -> why none of it can be read

    def _load(self, shard: int) -> tuple[int, list[list[Any]]]:
        """(fd, records) of a shard; raises BadSample when the shard as a whole is unusable."""
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        entry = self.shards[shard]
        if shard in self.bad_shards:
            raise BadSample(entry["name"], self.bad_shards[shard])
        try:
            records = self._records(entry)
            if self.cache is not None:
                fd = self.cache.open(entry)
            else:
                fd = os.open(Path(self.directory) / entry["name"], os.O_RDONLY)
        except DataError:  # the object store failed (not this shard): the stream stops with it
            raise
        except BadShard as exc:
            self.bad_shards[shard] = str(exc)
            raise BadSample(entry["name"], str(exc)) from exc
        except (OSError, ValueError, KeyError, TypeError, tarfile.TarError) as exc:
            why = str(exc) if isinstance(exc, _Why) else f"unreadable ({type(exc).__name__}: {exc})"
            if isinstance(exc, OSError) and exc.strerror:
                why = f"unreadable ({exc.strerror})"
            self.bad_shards[shard] = why
            raise BadSample(entry["name"], why) from exc
        self._open[shard] = (fd, records)
        if len(self._open) > OPEN_SHARDS:
            os.close(self._open.popitem(last=False)[1][0])
        return fd, records

    def _records(self, entry: dict[str, Any]) -> list[list[Any]]:
        index = entry.get("index")
        if index is None:
            if self.cache is not None:
                raise _Why("no per-sample index: re-run tools/make_shards.py to read it from a URL")
            records = index_tar(Path(self.directory) / entry["name"], hashes=False)
        else:
            if self.cache is not None:  # once per node, not per worker: the cache keeps it too
                fd = self.cache.open(index)
                with open(fd, "rb") as f:
                    data = f.read()
            else:
                data = (Path(self.directory) / index["name"]).read_bytes()
            if len(data) != index["bytes"] or hashlib.sha256(data).hexdigest() != index["sha256"]:
                raise _Why(f"index {index['name']} differs from the manifest (size or sha256)")
            records = json.loads(data)["samples"]
        if len(records) != entry["count"]:
            raise _Why(f"{len(records)} images where the manifest says {entry['count']}")
        return records

    def key(self, shard: int, sample: int) -> str:
        return self._load(shard)[1][sample][0]

    def read(self, shard: int, sample: int) -> bytes:
        """The sample's encoded bytes, checked against its sha256 when the index has one."""
        fd, records = self._load(shard)
        _, member, offset, size, sha = records[sample]
        name = self.shards[shard]["name"]
        try:
            data = os.pread(fd, size, offset)
        except OSError as exc:
            raise BadSample(name, f"{member}: unreadable ({exc})") from exc
        if len(data) != size:
            raise BadSample(name, f"{member}: {len(data)} of {size} bytes (truncated shard)")
        if sha is not None and hashlib.sha256(data).hexdigest() != sha:
            raise BadSample(name, f"{member}: sha256 differs from the index")
        return data

    def close(self) -> None:
        for fd, _ in self._open.values():
            os.close(fd)
        self._open.clear()


class _Why(ValueError):
    """A reason a shard is unusable, already worded for the user."""
