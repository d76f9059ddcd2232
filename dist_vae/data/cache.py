"""A node-local cache of whole remote shards under a byte budget, shared by every rank and worker.

`ShardCache.open(entry)` returns an open file descriptor of the shard's local copy. The first
process to need a shard downloads it (a lock file per shard: one download per node), to a
temporary name, checks its size and sha256 against the manifest (a mismatch is fetched once more,
then the shard is bad: `BadShard`), and renames it into place. The cache's state (bytes and last
use per shard, the ETag each was first read under) is one small JSON file updated under a lock:
eviction takes the least recently used shards until the new one fits, so the directory never holds
more than the budget (temporary files included: their bytes are reserved before the download);
nothing scans the directory. A shard evicted while another process still reads it stays readable
through that process's descriptor.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_vae.data.storage import Store, sha256_file
from dist_vae.errors import DataError

STATE = ".cache-state.json"


class BadShard(Exception):
    """A shard whose bytes differ from the manifest twice in a row."""


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _alive(pid: int) -> bool:
    """Whether a download by process `pid` (0: none) of this node may still be in flight."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class ShardCache:
    """The cache of `store`'s shards in `directory` (picklable: each worker holds a copy)."""

    store: Store
    directory: Path
    budget: int

    def check(self, shards: list[dict[str, Any]]) -> None:
        """Refuse a budget too small for the largest shard, in one line."""
        largest = max((s.get("bytes", 0) for s in shards), default=0)
        if largest > self.budget:
            raise DataError(
                f"data.cache_bytes={self.budget} is smaller than the largest shard of {self.store.url} "
                f"({largest} bytes): set data.cache_bytes to at least a few shards"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / ".locks").mkdir(exist_ok=True)
        for tmp in self.directory.glob(".*.tmp"):  # left by downloads killed with their process
            pid = tmp.name.rsplit(".", 2)[-2]
            if pid.isdigit() and not _alive(int(pid)):
                tmp.unlink(missing_ok=True)

    def open(self, entry: dict[str, Any]) -> int:
        """A read-only descriptor of the shard's verified local copy (downloaded if needed)."""
        name = entry["name"]
        path = self.directory / name
        (self.directory / ".locks").mkdir(parents=True, exist_ok=True)
        with _locked(self.directory / ".locks" / f"{name}.lock"):
            with self._state() as state:
                if name in state["shards"] and not state["shards"][name][2] and path.is_file():
                    state["clock"] += 1
                    state["shards"][name][1] = state["clock"]
                    return os.open(path, os.O_RDONLY)
            size = entry.get("bytes") or self.store.head(name)[0]
            while True:  # room is made under the state lock; a full cache of pending downloads waits
                with self._state() as state:
                    if self._make_room(state, name, size):
                        state["clock"] += 1
                        state["shards"][name] = [size, state["clock"], os.getpid()]  # reserved: downloading
                        break
                time.sleep(0.05)
            try:
                self._download(entry, path)
            except BaseException:
                with self._state() as state:
                    state["shards"].pop(name, None)
                raise
            with self._state() as state:
                state["shards"][name][2] = 0
                return os.open(path, os.O_RDONLY)

    def _download(self, entry: dict[str, Any], path: Path) -> None:
        name = entry["name"]
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
        why = ""
        for _ in range(2):
            with self._state() as state:
                etag = state["etags"].get(name)
            try:
                got = self.store.download(name, tmp, etag)
                actual = tmp.stat().st_size
                if "bytes" in entry and actual != entry["bytes"]:
                    why = f"{actual} bytes where the manifest says {entry['bytes']}"
                elif "sha256" in entry and sha256_file(tmp) != entry["sha256"]:
                    why = "sha256 differs from the manifest"
                else:
                    with self._state() as state:
                        state["etags"].setdefault(name, got)
                    os.replace(tmp, path)
                    return
            finally:
                tmp.unlink(missing_ok=True)
        raise BadShard(f"downloaded twice from {self.store.url}: {why}")

    def _make_room(self, state: dict[str, Any], name: str, size: int) -> bool:
        """Evict least recently used finished shards until `size` more bytes fit; False if they cannot
        yet (the rest is downloads in flight)."""
        shards = state["shards"]
        shards.pop(name, None)  # a reservation left by a killed download of the same shard
        used = sum(s for s, _, _ in shards.values())
        by_age = sorted((t, n) for n, (_, t, pid) in shards.items() if not _alive(pid))
        while used + size > self.budget and by_age:
            _, victim = by_age.pop(0)
            used -= state["shards"].pop(victim)[0]
            (self.directory / victim).unlink(missing_ok=True)
        return used + size <= self.budget

    @contextlib.contextmanager
    def _state(self) -> Iterator[dict[str, Any]]:
        path = self.directory / STATE
        with _locked(self.directory / ".locks" / "state.lock"):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                state = {"clock": 0, "shards": {}, "etags": {}}
            before = json.dumps(state, sort_keys=True)
            yield state
            after = json.dumps(state, sort_keys=True)
            if after != before:
                tmp = path.with_name(f"{STATE}.{os.getpid()}.tmp")
                tmp.write_text(after)
                os.replace(tmp, path)
