"""An S3-compatible server on 127.0.0.1 (moto's standalone server) and a fault-injecting TCP proxy of
the tests' own between the client and it: seeded, bounded, counting the requests it forwards."""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

BUCKET = "shards"  # the bucket the `server` fixture (tests/conftest.py) creates
SLOW_DOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
    b"Content-Length: 89\r\n\r\n"
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>\n\n"
)
_REQUEST = re.compile(rb"^(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/1\.[01]\r\n")


class FaultyProxy:
    """Forwards 127.0.0.1:port to `upstream`; each request is, with probability `rate`, answered with
    a 503 SlowDown, reset before its response, or reset part-way through its response body (at most
    `max_faults` in all, never more than `max_in_a_row` in a row). `delay_s` is added per request.
    While `down` is set, every connection and request is reset (`refused` counts them): the store is
    unreachable however often it is retried."""

    def __init__(
        self, upstream: int, rate: float = 0.0, seed: int = 0, max_faults: int = 1000, max_in_a_row: int = 2,
        delay_s: float = 0.0,
    ) -> None:  # fmt: skip
        self.upstream, self.rate, self.delay_s = upstream, rate, delay_s
        self.max_faults, self.max_in_a_row = max_faults, max_in_a_row
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.faults: Counter[str] = Counter()
        self.requests: Counter[tuple[str, str]] = Counter()  # (method, path) forwarded
        self._row = 0
        self.down = False
        self.refused = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop = True
        self.server.close()

    def _fault(self, method: str) -> str | None:
        with self.lock:
            if (
                self.rate <= 0
                or sum(self.faults.values()) >= self.max_faults
                or self._row >= self.max_in_a_row
                or self.rng.random() >= self.rate
            ):
                self._row = 0
                return None
            self._row += 1
            kind = self.rng.choice(["503", "reset", "cut"] if method == "GET" else ["503", "reset"])
            self.faults[kind] += 1
            return kind

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _refuse(self, client: socket.socket) -> None:
        with self.lock:
            self.refused += 1
        _reset(client)

    def _serve(self, client: socket.socket) -> None:
        if self.down:
            self._refuse(client)
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream))
        state = {"cut_after": -1, "sent": 0}
        threading.Thread(target=self._responses, args=(upstream, client, state), daemon=True).start()
        try:
            while data := client.recv(1 << 16):
                match = _REQUEST.match(data)
                if match and self.down:
                    self._refuse(client)
                    break
                if match:
                    method, path = match.group(1).decode(), match.group(2).decode().split("?")[0]
                    fault = self._fault(method) if method in ("GET", "HEAD") else None
                    if fault == "503":
                        client.sendall(SLOW_DOWN)
                        break
                    if fault == "reset":
                        _reset(client)
                        break
                    state["sent"] = 0
                    state["cut_after"] = self.rng.randrange(200, 4000) if fault == "cut" else -1
                    with self.lock:
                        self.requests[(method, path)] += 1
                    if self.delay_s:
                        time.sleep(self.delay_s)
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _close(client)
            _close(upstream)

    def _responses(self, upstream: socket.socket, client: socket.socket, state: dict) -> None:
        try:
            while data := upstream.recv(1 << 16):
                cut, sent = state["cut_after"], state["sent"]
                if cut >= 0 and sent + len(data) > cut:
                    client.sendall(data[: max(0, cut - sent)])
                    _reset(client)
                    return
                client.sendall(data)
                state["sent"] = sent + len(data)
        except OSError:
            pass
        finally:
            _close(client)


def _reset(sock: socket.socket) -> None:
    """Drop the connection at once. shutdown wakes the other thread blocked in recv on it (a bare
    close would wait for that recv, and the client would wait for its deadline)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


@contextlib.contextmanager
def sampled_sizes(cache: Path) -> Iterator[list[int]]:
    """The bytes of shards (finished and temporary) in the directory `cache`, sampled by a thread every
    few milliseconds while the block runs: one listing each, dot files included."""
    sizes: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            total = 0
            for entry in os.scandir(cache) if cache.is_dir() else []:
                if entry.name.endswith((".tar", ".tar.tmp")) or ".tar." in entry.name:
                    with contextlib.suppress(OSError):  # evicted since the listing
                        total += entry.stat().st_size
            sizes.append(total)
            done.wait(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield sizes
    finally:
        done.set()
        sampler.join()


def id_shard_set(root: Path, count: int) -> Path:
    """`count` id images (tests/data_fixtures.py) in root/images, built into 8 px PNG shards of 7 images,
    all in train, under root/shards."""
    from dist_vae.data.shards import ShardSettings, build_shards
    from tests.data_fixtures import id_images

    id_images(root / "images", count)
    settings = ShardSettings(
        source=f"folder:{root / 'images'}", resolution=8, format="png", shard_size=7, val_fraction=0.0
    )
    build_shards(settings, root / "shards", progress=False)
    return root / "shards"


@contextlib.contextmanager
def moto_server() -> Iterator[int]:
    """A moto S3 server on 127.0.0.1 (port chosen by the system); yields its port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield server.get_host_and_port()[1]
    finally:
        server.stop()


def s3_env(endpoint: str) -> dict[str, str]:
    """The standard environment that points a client at `endpoint` with test credentials."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }


def create_bucket(port: int, bucket: str) -> None:
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}/{bucket}", method="PUT")
    urllib.request.urlopen(request).close()


def upload_dir(port: int, local: Path, url: str) -> None:
    """Copy every file of `local` (not dot-files) to `url` straight to the server, no faults."""
    from dist_vae.data.storage import Store

    old = {k: os.environ.get(k) for k in s3_env("")}
    os.environ.update(s3_env(f"http://127.0.0.1:{port}"))
    try:
        store = Store(url)
        for path in sorted(local.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                store.write(path.name, path.read_bytes())
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def s3_copy(local: Path, url: str, **faults: float) -> Iterator[FaultyProxy]:
    """The files of `local` at the s3:// `url` of a fresh moto server, behind a FaultyProxy(**faults)."""
    with moto_server() as port:
        create_bucket(port, url.removeprefix("s3://").split("/")[0])
        upload_dir(port, local, url)
        proxy = FaultyProxy(port, **faults)  # type: ignore[arg-type]
        try:
            yield proxy
        finally:
            proxy.close()


def make_public(port: int, bucket: str, prefix: str) -> None:
    """Let anyone read the objects under `prefix` of `bucket` without credentials (a bucket policy), as
    a public bucket or a plain web server serves them: HEAD and GET, nothing else."""
    import json

    import boto3

    statement = {"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:HeadObject"],
                 "Resource": f"arn:aws:s3:::{bucket}/{prefix}*"}  # fmt: skip
    env = s3_env("")
    client = boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{port}", region_name=env["AWS_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )  # fmt: skip
    client.put_bucket_policy(
        Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [statement]})
    )
