"""A node-local cache of remote files (shards, their indexes) under a byte budget, shared by every
rank and worker.

`ShardCache.open(entry)` returns an open file descriptor of the file's local copy. The first
process to need a file downloads it (a lock file per file: one download per node), to a
temporary name, checks its size and sha256 against the manifest (a mismatch is fetched once more,
then the shard is bad: `BadShard`), and renames it into place. `fetch_ahead(entry)` does the same
for read-ahead (prefetch.py) but never waits: it skips a file another process is fetching or one
that does not fit yet. The cache's state (bytes and last use per file, the ETag each was first read
under, the files each live reader has pinned as its next) is one small JSON file updated under a
lock: eviction takes the least recently used files until the new one fits, pinned files last and
never for read-ahead, so the directory never holds more than the budget (temporary files included:
their bytes are reserved before the download); nothing scans the directory. A file evicted while
another process still reads it stays readable through that process's descriptor.
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
def _locked(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold `path`'s lock; without `wait`, yield False at once when another holder has it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
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
        """A read-only descriptor of the file's verified local copy (downloaded if needed)."""
        fd = self._get(entry, ahead=False)
        assert fd is not None  # only read-ahead gives up
        return fd

    def fetch_ahead(self, entry: dict[str, Any]) -> bool:
        """Download the file for a reader that needs it soon; False at once when another process is
        fetching it or it does not fit without evicting a pinned file (ask again later)."""
        fd = self._get(entry, ahead=True)
        if fd is not None:
            os.close(fd)
        return fd is not None

    def pin(self, names: list[str]) -> None:
        """Keep `names`, the files this process reads next, from eviction while it lives ([]: none)."""
        with self._state() as state:
            pins = state.setdefault("pins", {})
            for pid in [p for p in pins if not _alive(int(p))]:
                del pins[pid]
            if names:
                pins[str(os.getpid())] = names
            else:
                pins.pop(str(os.getpid()), None)

    def _get(self, entry: dict[str, Any], ahead: bool) -> int | None:
        name = entry["name"]
        path = self.directory / name
        (self.directory / ".locks").mkdir(parents=True, exist_ok=True)
        with _locked(self.directory / ".locks" / f"{name}.lock", wait=not ahead) as held:
            if not held:
                return None
            with self._state() as state:
                if name in state["shards"] and not state["shards"][name][2] and path.is_file():
                    if not ahead:  # a use (a look ahead is not one: the file is pinned meanwhile)
                        state["clock"] += 1
                        state["shards"][name][1] = state["clock"]
                    return os.open(path, os.O_RDONLY)
            size = entry.get("bytes") or self.store.head(name)[0]
            while True:  # room is made under the state lock; a full cache of pending downloads waits
                with self._state() as state:
                    if self._make_room(state, name, size, ahead):
                        state["clock"] += 1
                        state["shards"][name] = [size, state["clock"], os.getpid()]  # reserved: downloading
                        break
                if ahead:
                    return None
                time.sleep(0.05)
            try:
                etag = self._download(entry, path)
            except BaseException:
                with self._state() as state:
                    state["shards"].pop(name, None)
                raise
            with self._state() as state:
                state["shards"][name][2] = 0
                state["etags"].setdefault(name, etag)
                return os.open(path, os.O_RDONLY)

    def _download(self, entry: dict[str, Any], path: Path) -> str | None:
        """Fetch and verify the file into place; the ETag it was read under."""
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
                    os.replace(tmp, path)
                    return got
            finally:
                tmp.unlink(missing_ok=True)
        raise BadShard(f"{name} downloaded twice from {self.store.url}: {why}")

    def _make_room(self, state: dict[str, Any], name: str, size: int, ahead: bool) -> bool:
        """Evict least recently used finished files, unpinned ones first (only those when `ahead`),
        until `size` more bytes fit; False if they cannot yet (the rest is in flight or pinned)."""
        files = state["shards"]
        if name in files:  # a reservation left by a killed download of the same file
            self._forget(files, name)
        pinned = {n for pid, names in state.get("pins", {}).items() if _alive(int(pid)) for n in names}
        used = sum(s for s, _, _ in files.values())
        idle = sorted((n in pinned, t, n) for n, (_, t, pid) in files.items() if not _alive(pid))
        for is_pinned, _, victim in idle:
            if used + size <= self.budget or (is_pinned and ahead):
                break
            used -= self._forget(files, victim)
        return used + size <= self.budget

    def _forget(self, files: dict[str, list[int]], name: str) -> int:
        """Drop `name` and its bytes on disk (the file, or what a killed download of it left); its size."""
        size, _, pid = files.pop(name)
        (self.directory / name).unlink(missing_ok=True)
        if pid:
            (self.directory / f".{name}.{pid}.tmp").unlink(missing_ok=True)
        return size

    @contextlib.contextmanager
    def _state(self) -> Iterator[dict[str, Any]]:
        path = self.directory / STATE
        with _locked(self.directory / ".locks" / "state.lock"):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                state = {"clock": 0, "shards": {}, "etags": {}, "pins": {}}
            before = json.dumps(state, sort_keys=True)
            yield state
            after = json.dumps(state, sort_keys=True)
            if after != before:
                tmp = path.with_name(f"{STATE}.{os.getpid()}.tmp")
                tmp.write_text(after)
                os.replace(tmp, path)
