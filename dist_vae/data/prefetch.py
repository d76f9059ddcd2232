"""Read-ahead: the files the position plan needs next, fetched into the node-local cache before the
reader opens them.

Each DataLoader worker of a remote shard set tells its `ReadAhead` which batch it reads next
(`advance`). From there the plan names the shards in the order the sample sequence first needs them
(order.py: the rest of the shuffle group being read, then the next groups), so the worker pins its
next `AHEAD_GROUPS` groups of shards and their indexes in the cache (a pinned file is never evicted
to make room for read-ahead, and last for anything else), within half the cache's budget, and
`THREADS` threads download those not there yet, in the order they are needed. The cache's lock
per file keeps that to one download per node: a file another process is fetching is skipped here
and looked at again when the window moves. The reader is unchanged (it opens the same files through
the same cache), so the samples and their bytes are the same with or without read-ahead; only the
downloads come earlier. A read-ahead that fails is dropped: the reader meets the error itself.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from typing import Any

from dist_vae.data.cache import ShardCache
from dist_vae.data.plan import Plan

AHEAD_GROUPS = 2  # shuffle groups of shards pinned and fetched ahead of the reader
THREADS = 4  # downloads in flight per worker


class ReadAhead:
    """One worker's read-ahead for `plan`; its threads are daemons, which die with the worker."""

    def __init__(self, plan: Plan, cache: ShardCache) -> None:
        self.plan = dataclasses.replace(plan, order=copy.copy(plan.order))  # group caches of its own
        self.cache = cache
        self.most_shards = AHEAD_GROUPS * plan.order.group
        self.most_bytes = cache.budget // 2
        self.window: list[dict[str, Any]] = []  # the files to have, in the order they are needed
        self.names: set[str] = set()
        self.here: set[str] = set()  # of the window: in the cache
        self.busy: set[str] = set()  # being fetched by a thread of this worker
        self.skipped: set[str] = set()  # fetched elsewhere or not fitting: looked at when the window moves
        self.changed = threading.Condition()
        self.closed = False
        for _ in range(THREADS):
            threading.Thread(target=self._fetch, daemon=True, name="read-ahead").start()

    def advance(self, start: int, j: int) -> None:
        """The worker reads batch j of the iteration that started at `start` next."""
        window: list[dict[str, Any]] = []
        size, seen = 0, set[int]()
        for shard in self.plan.upcoming(start, j):
            if shard in seen or len(seen) == self.most_shards:  # a repeat: the window spans an epoch
                break
            seen.add(shard)
            entry = self.plan.shards[shard]
            files = [entry["index"], entry] if "index" in entry else []  # no index: a bad shard (index.py)
            more = sum(f["bytes"] for f in files)
            if window and size + more > self.most_bytes:
                break
            window, size = window + files, size + more
        names = {f["name"] for f in window}
        if names == self.names:  # the same files, perhaps needed in another order
            self.window = window
            return
        self.cache.pin(sorted(names))
        with self.changed:
            self.window, self.names = window, names
            self.here &= names
            self.skipped.clear()
            self.changed.notify_all()

    def close(self) -> None:
        """Stop fetching (a download in flight finishes or dies with the worker) and unpin."""
        with self.changed:
            self.closed = True
            self.changed.notify_all()
        self.cache.pin([])

    def _next(self) -> dict[str, Any] | None:
        done = self.here | self.busy | self.skipped
        return next((f for f in self.window if f["name"] not in done), None)

    def _fetch(self) -> None:
        while True:
            with self.changed:
                while not self.closed and (entry := self._next()) is None:
                    self.changed.wait()
                if self.closed:
                    return
                self.busy.add(entry["name"])
            try:
                here = self.cache.fetch_ahead(entry)
            except Exception:  # the reader meets it again and handles it (retries, substitutes, exit)
                here = False
            with self.changed:
                self.busy.discard(entry["name"])
                if entry["name"] in self.names:
                    (self.here if here else self.skipped).add(entry["name"])
