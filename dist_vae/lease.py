"""One owner at a time for a directory (a shard output, a run directory), also across the nodes of a
shared filesystem where `flock` may not work: a lease file created atomically and kept fresh.

The lease file is JSON: host, pid, what holds it, its Slurm job and step, when it started, a
heartbeat (wall-clock seconds) and a token unique to the holder. It is published by `os.link` of a
fully written private file, which succeeds for exactly one of several racing processes, NFS
included. While held, a daemon thread renews the heartbeat every `interval` seconds.

A lease is stale, and taken over with one line, when its holder is gone: its pid is not running on
this host, or its heartbeat is older than `timeout` seconds (a holder on another node, or a frozen
one; clocks of the nodes must agree to well within `timeout`). Taking over happens under a second,
short-lived lock file (created the same way), so of several takers one wins and the others then see
its live lease.

Stdlib only: the trainer's run directories and make_shards' outputs use the same module.
`python -m dist_vae.lease PATH` prints the live holder of the lease PATH in one line, or nothing when
it is free or its holder is gone (cluster/launch.sh waits on it before starting a requeued run).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

TIMEOUT_S = 60.0  # a heartbeat older than this marks the holder as gone
INTERVAL_S = 5.0  # how often the holder renews its heartbeat
LOCK_STALE_S = 10.0  # a take-over lock is held for milliseconds; one this old belongs to a dead taker


class LeaseHeld(RuntimeError):
    """The lease belongs to a live holder; the message names it and what to do."""

    def __init__(self, path: Path, holder: dict[str, Any], timeout: float) -> None:
        self.path, self.holder = path, holder
        super().__init__(
            f"{path.parent} is in use by {describe(holder)} (lease {path}); wait for it to finish, or if "
            f"it is gone, for its lease to expire ({timeout:.0f} s without a heartbeat)"
        )


def describe(holder: dict[str, Any]) -> str:
    """'make_shards pid 123 on node7 (Slurm job 55.0), started 2026-12-06 20:01:02 UTC, heartbeat 3 s ago'."""
    job = holder.get("slurm_job")
    slurm = f" (Slurm job {job}{'.' + str(holder['slurm_step']) if holder.get('slurm_step') else ''})"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("start", 0)))
    age = time.time() - float(holder.get("heartbeat", 0))
    return (
        f"{holder.get('owner', 'a process')} pid {holder.get('pid')} on {holder.get('host')}"
        f"{slurm if job else ''}, started {started}, heartbeat {age:.0f} s ago"
    )


def _pid_running(pid: object) -> bool:
    """Whether a process of that id runs on this host (a reused id reads as running: the lease then
    waits for the heartbeat timeout, the safe side)."""
    try:
        pid = int(pid)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    """The lease's content; None when there is no lease; {} when it cannot be parsed (a torn write
    is impossible by construction, so this is a foreign file: treated as stale once it is old)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


class Lease:
    """`with Lease(dir / ".lease.json", owner="make_shards") as lease:` holds `dir` for this process.

    `acquire` raises LeaseHeld when a live holder has it; after it, `taken_over` is the stale holder's
    description (one line for the user) or None.
    """

    def __init__(
        self, path: str | Path, owner: str, timeout: float = TIMEOUT_S, interval: float = INTERVAL_S
    ) -> None:
        self.path, self.owner = Path(path), owner
        self.timeout, self.interval = timeout, interval
        self.token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.taken_over: str | None = None
        self.lost = False  # set when another process took the lease (or it could not be renewed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._body: dict[str, Any] = {}

    def _stale(self, holder: dict[str, Any]) -> bool:
        if not holder:  # unparsable: stale once the file itself is old
            try:
                return time.time() - self.path.stat().st_mtime > self.timeout
            except FileNotFoundError:
                return True
        if holder.get("host") == socket.gethostname() and not _pid_running(holder.get("pid")):
            return True
        return time.time() - float(holder.get("heartbeat", 0)) > self.timeout

    def _link(self, path: Path, body: dict[str, Any]) -> bool:
        """Create `path` holding `body`, atomically and only if it does not exist (link of a fully
        written private file: NFS-safe): True if this process created it."""
        private = path.with_name(f"{path.name}.{self.token}")
        private.write_text(json.dumps(body, sort_keys=True))
        try:
            os.link(private, path)
            return True
        except FileExistsError:
            return False
        finally:
            private.unlink(missing_ok=True)

    def _take_over(self, holder: dict[str, Any]) -> bool:
        """Replace the stale lease `holder`; True if this process now holds the lease. Only the holder
        of the short-lived take-over lock removes a lease, and only the one it judged stale, so of
        several takers one wins and the others then find its fresh lease."""
        lock = self.path.with_name(f"{self.path.name}.takeover")
        if not self._link(lock, {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}):
            other = _read(lock)
            if other is not None and (
                time.time() - float(other.get("time", 0)) > LOCK_STALE_S
                or (other.get("host") == socket.gethostname() and not _pid_running(other.get("pid")))
            ):
                lock.unlink(missing_ok=True)  # its taker died within the few milliseconds it holds it
            return False
        try:
            current = _read(self.path)
            if current is not None and current.get("token") != holder.get("token"):
                return False  # the lease changed meanwhile: look at it again
            self.path.unlink(missing_ok=True)
            if not self._link(self.path, self._body):
                return False
            self.taken_over = describe(holder) if holder else "an unreadable lease file"
            return True
        finally:
            lock.unlink(missing_ok=True)

    def acquire(self) -> Lease:
        now = time.time()
        self._body = {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "slurm_step": os.environ.get("SLURM_STEP_ID"),
            "start": now,
            "heartbeat": now,
            "token": self.token,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + 2 * LOCK_STALE_S
        while not self._link(self.path, self._body):
            holder = _read(self.path)
            if holder is None:
                continue  # released meanwhile
            if not self._stale(holder):
                raise LeaseHeld(self.path, holder, self.timeout)
            if self._take_over(holder):
                break
            if time.monotonic() > deadline:
                raise LeaseHeld(self.path, _read(self.path) or holder, self.timeout)
            time.sleep(0.01)
        self._sweep()
        self._thread = threading.Thread(target=self._beat, name=f"lease {self.path}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if (_read(self.path) or {}).get("token") != self.token:
                    self.lost = True
                    return
                self._body["heartbeat"] = time.time()
                fresh = self.path.with_name(f"{self.path.name}.{self.token}")
                fresh.write_text(json.dumps(self._body, sort_keys=True))
                os.replace(fresh, self.path)
            except OSError:  # the directory removed, the disk full: the holder learns it by still_held()
                self.lost = True
                return

    def still_held(self) -> bool:
        """Whether the lease file still names this process (one small read; callers check between
        units of work so that a process taken over as gone stops before writing more)."""
        if not self.lost and (_read(self.path) or {}).get("token") != self.token:
            self.lost = True
        return not self.lost

    def _sweep(self) -> None:
        """Remove private files (`NAME.HOST-PID-RANDOM`) that dead processes on this host left behind
        between writing and linking them; other hosts' are left alone."""
        host = socket.gethostname()
        for private in self.path.parent.glob(f"{self.path.name}.{host}-*"):
            pid = private.name.removeprefix(f"{self.path.name}.{host}-").split("-")[0]
            if pid.isdigit() and not _pid_running(int(pid)):
                private.unlink(missing_ok=True)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this process's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if (_read(self.path) or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def live_holder(self) -> dict[str, Any] | None:
        """The holder of the lease file as it is now, unless there is none or it is gone (stale)."""
        holder = _read(self.path)
        return holder if holder is not None and not self._stale(holder) else None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


if __name__ == "__main__":
    import sys

    live = Lease(sys.argv[1], owner="a check").live_holder()
    if live is not None:
        print(describe(live) if live else "an unreadable lease file")
