"""Where a shard set lives: a local directory or an object-store URL, as reads and writes of bytes.

Only this module knows URLs; the rest of data/ names files inside a shard set and gets bytes back.
Remote sets go through obstore; endpoint, region and credentials come from the standard environment
(`AWS_*`, `GOOGLE_*`, `AZURE_*`) and are never written anywhere: messages name the URL and cause.
Transient errors (reset, timeout, HTTP 500/502/503, a body cut short) are retried with backoff and
jitter, a cut body resumed from its last byte under its ETag; permanent ones raise `RemoteError`,
transient ones that outlast the retries `StoreUnreachable`. Thread-safe (read-ahead threads).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from dist_vae.errors import DataError

SCHEMES = ("s3", "gs", "az", "abfs", "https", "http")
CHUNK = 8 << 20  # bytes per streamed chunk of a download
BACKOFF_S = 0.05  # first wait before a retry; doubled per retry, capped, times a jitter in [0.5, 1)
BACKOFF_CAP_S = 5.0

_ENV_PREFIXES = ("AWS_", "GOOGLE_", "AZURE_")  # a changed environment gets a new client
_clients: dict[tuple[str, int, Any], Any] = {}
_leaf_pid = 0
counters = {"retries": 0, "bytes": 0, "requests": 0}  # this process's, since it started
_counting = threading.Lock()

T = TypeVar("T")


class RemoteError(DataError):
    """A permanent error of the object store (missing object or bucket, denied, replaced object)."""


class NoSuchObject(RemoteError):
    """The object or its bucket does not exist."""


class StoreUnreachable(DataError):
    """The object store still fails transiently after every retry: worth trying again later."""


_ERRORS = {cls.__name__: cls for cls in (RemoteError, NoSuchObject, StoreUnreachable)}


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names an object-store location rather than a local path."""
    scheme, sep, _ = str(path).partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


def join(location: str | os.PathLike[str], name: str) -> str:
    """`name` inside `location`, for messages (a URL or a local path)."""
    return f"{str(location).rstrip('/')}/{name}" if is_url(location) else str(Path(location) / name)


@dataclass(frozen=True)
class Store:
    """A remote shard set at `url` (picklable: workers get a copy and make their own client)."""

    url: str
    retries: int = 8
    deadline_s: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", self.url.rstrip("/"))

    def _client(self) -> Any:
        env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)))
        key = (self.url, os.getpid(), env)
        if key not in _clients:
            from obstore.store import from_url

            try:
                _clients[key] = from_url(
                    self.url,
                    client_options={
                        "allow_http": os.environ.get("AWS_ALLOW_HTTP", "").lower() == "true"
                        or self.url.startswith("http://"),
                        "timeout": timedelta(seconds=self.deadline_s),
                        "connect_timeout": timedelta(seconds=min(self.deadline_s, 10.0)),
                    },
                    retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=self.deadline_s)},
                )
            except Exception as exc:  # a malformed URL or configuration: obstore's message says which
                raise RemoteError(f"{self.url}: cannot open the object store ({_cause(exc)})") from exc
        return _clients[key]

    def _retrying(self, name: str, call: Callable[[], T]) -> T:
        for attempt in range(self.retries + 1):
            try:
                _count("requests", 1)
                return call()
            except Exception as exc:
                permanent = _permanent(exc)
                if permanent is not None:
                    kind = NoSuchObject if isinstance(exc, FileNotFoundError) else RemoteError
                    raise kind(f"{join(self.url, name)}: {permanent}") from exc
                if attempt == self.retries:
                    raise StoreUnreachable(
                        f"{join(self.url, name)}: object store unreachable after {self.retries} retries "
                        f"({_cause(exc)})"
                    ) from exc
                _count("retries", 1)
                time.sleep(min(BACKOFF_CAP_S, BACKOFF_S * 2**attempt) * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    def head(self, name: str) -> tuple[int, str | None]:
        """(size, ETag) of the object `name`."""
        import obstore

        def fetch() -> list:
            meta = self._retrying(name, lambda: obstore.head(self._client(), name))
            return [int(meta["size"]), meta.get("e_tag")]

        size, etag = _isolated(fetch)
        return size, etag

    def read(self, name: str) -> bytes:
        """The whole object `name` (small objects: manifests and indexes)."""

        def fetch() -> bytes:
            out = bytearray()
            self._fetch(name, out.extend, None)
            return bytes(out)

        return _isolated(fetch)

    def download(self, name: str, dest: Path, etag: str | None = None) -> str | None:
        """Write the object `name` to the local file `dest`; returns the ETag it was read under (the
        given one, when set: a different object is then a RemoteError naming it)."""

        def fetch() -> str | None:
            with open(dest, "wb") as f:
                return self._fetch(name, f.write, etag)

        return _isolated(fetch)

    def _fetch(self, name: str, sink: Callable[[Any], Any], etag: str | None) -> str | None:
        """Stream the object into `sink`, resuming a cut body from its last byte under its ETag."""
        import obstore

        done = 0
        size: int | None = None

        def attempt() -> None:
            nonlocal done, size, etag
            options: dict[str, Any] = {}
            if etag is not None:
                options["if_match"] = etag
            if done:
                options["range"] = {"offset": done}
            result = obstore.get(self._client(), name, options=options)
            meta = result.meta
            if etag is None:
                etag = meta.get("e_tag")
            if size is None:
                size = int(meta["size"])
            for chunk in result.stream(min_chunk_size=CHUNK):
                sink(chunk)
                done += len(chunk)
                _count("bytes", len(chunk))
            if done != size:
                raise _Truncated(f"body cut short: {done} of {size} bytes")

        self._retrying(name, attempt)
        return etag

    def write(self, name: str, data: bytes | Path) -> None:
        """Put `data` (bytes, or a local file: multipart above 5 MiB) as the object `name`."""
        import obstore

        _isolated(lambda: self._retrying(name, lambda: obstore.put(self._client(), name, data)))

    def delete(self, name: str) -> None:
        import obstore

        _isolated(lambda: self._retrying(name, lambda: obstore.delete(self._client(), name)))


def mark_leaf() -> None:
    """Say that this process never forks (a DataLoader worker): it may hold an obstore client itself.

    obstore's runtime does not survive a fork: a child forked after its parent used obstore hangs on
    its first request. So a process not marked (the trainer's main process, which forks workers
    later) makes each request in a short-lived forked child of its own and never starts the runtime.
    """
    global _leaf_pid
    _leaf_pid = os.getpid()


def _isolated(call: Callable[[], T]) -> T:
    """`call()` here in a leaf process, else in a forked child (see mark_leaf). The child sends back
    one JSON line (the result or the error's class and message, and its counts) and, for a result in
    bytes, those bytes: plain data, so nothing the parent reads can run code."""
    if _leaf_pid == os.getpid():
        return call()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(read_end)
            before = dict(counters)
            payload = b""
            try:
                value = call()
                head: dict[str, Any] = {"bytes": True} if isinstance(value, bytes) else {"value": value}
                payload = value if isinstance(value, bytes) else b""
            except BaseException as exc:
                head = {"error": type(exc).__name__, "message": str(exc)}
            head["counts"] = {k: counters[k] - before[k] for k in counters}
            with os.fdopen(write_end, "wb") as f:
                f.write(json.dumps(head).encode() + b"\n" + payload)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    line, _, payload = data.partition(b"\n")
    if not line:
        raise DataError("an object-store request died with its helper process")
    head = json.loads(line)
    for k, n in head["counts"].items():
        _count(k, n)
    if "error" in head:
        raise _ERRORS.get(head["error"], DataError)(head["message"])
    return payload if head.get("bytes") else head["value"]


class _Truncated(Exception):
    pass


def _count(key: str, n: int) -> None:
    with _counting:
        counters[key] += n


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


_CODE = re.compile(r"<Code>([^<]+)</Code>")
_STATUS = re.compile(r"status code: (\d{3})")


def _cause(exc: BaseException) -> str:
    """A one-line cause: the S3 error code or HTTP status when there is one, else the first line."""
    text = str(exc)
    code, status = _CODE.search(text), _STATUS.search(text)
    parts = [m.group(1) for m in (status, code) if m]
    if parts:
        return " ".join(parts)
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _permanent(exc: BaseException) -> str | None:
    """Why `exc` will not go away by retrying, or None when it may (then it is retried)."""
    from obstore import exceptions as obs

    if isinstance(exc, FileNotFoundError | obs.NotFoundError):
        code = _CODE.search(str(exc))
        what = "no such bucket" if code and code.group(1) == "NoSuchBucket" else "no such object"
        return f"{what} ({_cause(exc)})"
    if isinstance(exc, obs.PreconditionError):
        return "the object changed during the run (its ETag differs): it was replaced; clear the cache"
    if isinstance(exc, PermissionError | obs.PermissionDeniedError | obs.UnauthenticatedError):
        return f"access denied: check the credentials in the environment ({_cause(exc)})"
    if isinstance(exc, obs.UnknownConfigurationKeyError | obs.InvalidPathError | obs.NotSupportedError):
        return _cause(exc)
    if "169.254.169.254" in str(exc) or "169.254.170.2" in str(exc):  # the instance-metadata fallback
        return "no credentials in the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...) or instance metadata"
    status = _STATUS.search(str(exc))
    if status and status.group(1).startswith("4") and status.group(1) not in ("408", "429"):
        if status.group(1) in ("401", "403"):
            return f"access denied: check the credentials in the environment ({_cause(exc)})"
        return _cause(exc)
    text = str(exc).lower()
    if "credential" in text and "status code" not in text:
        return f"no credentials found in the environment ({_cause(exc)})"
    return None
