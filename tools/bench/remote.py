"""Training from an object store against training from the local copy, side by side.

    PYTHONPATH=. python tools/bench/remote.py --images 2000 --epochs 1

Builds demo shards, serves a copy from moto's S3 server on 127.0.0.1 behind the tests' proxy
(tests/remote_fixtures.py) with `--latency-ms` added per request (server and proxy in a process of
their own, as a real store would be), then starts two training runs at the same time, one reading
`s3://` (cold cache) and one the local shards, so the machine's noise falls on both. From each
run's TensorBoard scalars it prints the data-wait fraction and img/s over the whole run (the first
log window includes start-up and the cold cache), their remote/local ratio, bytes downloaded /
bytes of the shards used, and requests per image counted at the proxy. Then the stream alone (no
model, so the data path is the whole cost), local and remote rounds alternating, the median ratio.
Last, computed from the plan and the indexes: what a node would fetch over one epoch as byte ranges
of its own samples instead of whole shards, for 1, 2 and 8 nodes. The training run is a small
iterative VAE (`TRAIN` below); `--set KEY=VALUE` adds overrides.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "debug.yaml"

RANGE_GAP, RANGE_MOST = 1 << 20, 32 << 20  # byte ranges closer than RANGE_GAP share a request
# A light model, so that reading is a visible share of a step on the CPU.
TRAIN = ["data.resolution=32", "data.batch_size=32", "data.num_workers=2", "data.shuffle_group=4",
         "model.kind=iterative_vae", "model.refine_steps=2", "model.latent_dims=[2,2]", "model.channels=4",
         "train.log_every=5", "train.eval_every=1000000", "train.sample_every=1000000",
         "train.checkpoint_every=1000000"]  # fmt: skip


def serve(local: Path, latency_ms: float, fail_rate: float) -> None:
    """The store's process: moto, the bucket, the upload and the proxy; prints the proxy's URL, then
    answers each line on stdin with the requests forwarded so far."""
    from tests.remote_fixtures import FaultyProxy, create_bucket, moto_server, upload_dir

    with moto_server() as port:
        create_bucket(port, "bench")
        upload_dir(port, local, "s3://bench/shards")
        proxy = FaultyProxy(port, rate=fail_rate, delay_s=latency_ms / 1000)
        print(proxy.url, flush=True)
        for _ in sys.stdin:
            print(sum(proxy.requests.values()), flush=True)
        proxy.close()


class Server:
    """The store's process, seen from here."""

    def __init__(self, local: Path, args: argparse.Namespace) -> None:
        cmd = [sys.executable, __file__, "--serve", str(local), "--latency-ms", str(args.latency_ms),
               "--fail-rate", str(args.fail_rate)]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self.url = self.proc.stdout.readline().strip()  # type: ignore[union-attr]

    def requests(self) -> int:
        self.proc.stdin.write("\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return int(self.proc.stdout.readline())  # type: ignore[union-attr]

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait()


def s3_env(url: str) -> dict[str, str]:
    from tests.remote_fixtures import s3_env

    return {**os.environ, **s3_env(url), "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}


def train(run_dir: Path, path: str, steps: int, extra: list[str], env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "dist_vae" / "train.py"), "--config", str(CONFIG),
           f"run_dir={run_dir}", f"data.path={path}", f"train.steps={steps}", *TRAIN, *extra]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(name: str, proc: subprocess.Popen) -> float:
    """Wait for a training run; its CPU seconds (its DataLoader workers included)."""
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"the {name} training run failed:\n{proc.stderr.read()[-3000:]}")  # type: ignore[union-attr]
    proc.returncode = 0
    return usage.ru_utime + usage.ru_stime


def cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by the running process `pid` (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    """CPU seconds of this process and its children waited for (the stream's DataLoader workers)."""
    return sum(
        u.ru_utime + u.ru_stime
        for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )


def run_figures(run_dir: Path, batch: int, log_every: int) -> dict[str, float]:
    """img/s and the data-wait fraction over every log window, and the bytes downloaded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    rates = [s.value for s in events.Scalars("perf/img_per_s")]
    waits = [s.value for s in events.Scalars("perf/data_wait_fraction")]
    seconds = [batch * log_every / r for r in rates]  # each window is log_every steps
    tags = events.Tags()["scalars"]
    return {
        "img_s": sum(batch * log_every for _ in rates) / sum(seconds),
        "wait": sum(w * s for w, s in zip(waits, seconds, strict=True)) / sum(seconds),
        "bytes": events.Scalars("data/remote_bytes")[-1].value if "data/remote_bytes" in tags else 0.0,
    }


def stream_rate(cfg: object, images: int, batch: int, server: int) -> tuple[float, float, float]:
    """img/s of the stream alone, from its start and from its first batch on (past the cold start),
    and its CPU seconds (with the store's, when it is read)."""
    from dist_vae.data.stream import ShardStream

    batches = iter(ShardStream(cfg, seed=0, batch_size=batch))  # type: ignore[arg-type]
    cpu, started = own_cpu() + cpu_seconds(server), time.perf_counter()
    next(batches)
    first = time.perf_counter()
    for _ in islice(batches, images // batch - 1):
        pass
    done = time.perf_counter()
    batches.close()  # stops and waits for its workers, whose CPU is then counted
    rates = images // batch * batch / (done - started), (images // batch - 1) * batch / (done - first)
    return *rates, own_cpu() + cpu_seconds(server) - cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--training", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--stream-rounds", type=int, default=3, help="0: no stream alone")
    parser.add_argument("--set", nargs="*", default=[], help="more overrides of both training runs")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the store's process
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.latency_ms, args.fail_rate)
    from dist_vae.config import load_config
    from tests.data_fixtures import make_demo_shards

    cfg = load_config(CONFIG, [*TRAIN, *args.set])
    with tempfile.TemporaryDirectory() as tmp:
        local = make_demo_shards(
            Path(tmp) / "shards", args.images, 32, 0.0, "--shard-size", str(args.shard_size)
        )
        server = Server(local, args)
        env = s3_env(server.url)
        if args.training:
            training_runs(args, Path(tmp), local, server, cfg, env)
        if args.stream_rounds:
            stream_alone(args, local, env, cfg.data, server.proc.pid)
        server.close()
        ranges_alone(local, cfg.data.batch_size, cfg.data.shuffle_group, [1, 2, 8])


def training_runs(
    args: argparse.Namespace, tmp: Path, local: Path, server: Server, cfg: Any, env: dict
) -> None:
    """The two training runs at once; their figures side by side."""
    batch, log_every = cfg.data.batch_size, cfg.train.log_every
    train_split = json.loads((local / "manifest.json").read_text())["splits"]["train"]
    steps = math.ceil(args.epochs * train_split["count"] / batch / log_every) * log_every
    used = train_split["bytes"] * min(1.0, steps * batch / train_split["count"])
    before, store_cpu = server.requests(), cpu_seconds(server.proc.pid)
    cache = [f"data.cache_dir={tmp / 'cache'}"]
    runs = {"remote": train(tmp / "remote", "s3://bench/shards", steps, cache + args.set, env),
            "local": train(tmp / "local", str(local), steps, args.set, env)}  # fmt: skip
    cpu = {name: finish(name, proc) for name, proc in runs.items()}
    requests, store_cpu = server.requests() - before, cpu_seconds(server.proc.pid) - store_cpu
    remote, here = (run_figures(tmp / n, batch, log_every) for n in ("remote", "local"))
    images, shards = steps * batch, len(train_split["shards"])
    epochs = images / train_split["count"]
    print(f"training runs side by side: {images} images ({epochs:.2f} epochs) in {shards} shards, "
          f"batch {batch}, +{args.latency_ms:g} ms/request")  # fmt: skip
    print(f"data-wait fraction local {here['wait']:.3f}, remote {remote['wait']:.3f} (target <= 0.05)")
    print(f"img/s local {here['img_s']:.1f}, remote {remote['img_s']:.1f}, "
          f"remote/local {remote['img_s'] / here['img_s']:.3f} (target >= 0.95)")  # fmt: skip
    print(f"bytes downloaded / bytes used {remote['bytes'] / used:.3f} (target <= 1.1); "
          f"requests per image {requests / images:.4f}")  # fmt: skip
    print(f"CPU seconds local {cpu['local']:.1f}, remote {cpu['remote']:.1f} + the store's {store_cpu:.1f}")


def stream_alone(args: argparse.Namespace, local: Path, env: dict[str, str], data: Any, server: int) -> None:
    """The stream without a model, local and remote (cold cache) rounds alternating."""
    from dist_vae.data.config import DataConfig

    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    common = {"resolution": 32, "num_workers": data.num_workers, "shuffle_group": data.shuffle_group}
    n, batch, rounds = int(args.images * args.epochs), data.batch_size, args.stream_rounds
    ratios: list[tuple[float, float]] = []
    cpu = {"local": 0.0, "remote": 0.0}
    with tempfile.TemporaryDirectory() as caches:
        for r in range(rounds):
            far = DataConfig(path="s3://bench/shards", cache_dir=str(Path(caches) / str(r)), **common)
            *remote, cpu_remote = stream_rate(far, n, batch, server)
            *here, cpu_local = stream_rate(DataConfig(path=str(local), **common), n, batch, server)
            ratios.append((remote[0] / here[0], remote[1] / here[1]))
            cpu["remote"] += cpu_remote * 1000 / n / rounds
            cpu["local"] += cpu_local * 1000 / n / rounds
    whole, steady = (statistics.median(r[k] for r in ratios) for k in (0, 1))
    each = ", ".join(f"{a:.2f}/{b:.2f}" for a, b in ratios)
    print(f"stream alone (no model), {rounds} rounds: img/s remote/local median {whole:.3f}, from the "
          f"first batch on {steady:.3f} ({each}); CPU seconds per 1000 images local {cpu['local']:.2f}, "
          f"remote {cpu['remote']:.2f} (the store's included)")  # fmt: skip


def ranges_alone(local: Path, batch: int, group: int, nodes: list[int]) -> None:
    """Per node over one epoch, for N nodes of one rank each: KB fetched and requests per image read,
    fetching whole shards, byte ranges of the node's own samples merged across gaps up to RANGE_GAP
    (requests up to RANGE_MOST), or exact ranges. Computed from the plan and the indexes."""
    from dist_vae.data.order import SampleOrder

    shards = json.loads((local / "manifest.json").read_text())["splits"]["train"]["shards"]
    records = [json.loads((local / s["index"]["name"]).read_text())["samples"] for s in shards]
    order = SampleOrder([s["count"] for s in shards], seed=0, group=group, shuffle=True)
    print(
        f"per node and image read, one epoch: KB fetched, requests (gaps merged up to {RANGE_GAP >> 10} KB)"
    )
    for n in nodes:
        mine: list[list[tuple[int, int]]] = [[] for _ in shards]  # node 0's (offset, end) per shard
        for p in range(order.total):
            if (p // batch) % n == 0:  # global batch k is [k n B, (k+1) n B): node 0 reads its first B
                _, shard, sample = order.at(p)
                _, _, offset, size, _ = records[shard][sample]
                mine[shard].append((offset, offset + size))
        images, touched = sum(map(len, mine)), [i for i, spans in enumerate(mine) if spans]
        indexes = sum(shards[i]["index"]["bytes"] for i in touched)
        figures = [(sum(shards[i]["bytes"] for i in touched), len(touched))]
        for gap in (RANGE_GAP, 0):
            merged = [m for i in touched for m in merge(sorted(mine[i]), gap)]
            figures.append((sum(e - s for s, e in merged), len(merged)))
        each = [
            f"{(b + indexes) / images / 1000:.2f} KB, {(r + len(touched)) / images:.3f}" for b, r in figures
        ]
        print(f"  {n} node(s): whole shards {each[0]}; merged ranges {each[1]}; exact ranges {each[2]}")


def merge(spans: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """Sorted byte spans merged across gaps up to `gap`, each request at most RANGE_MOST bytes."""
    out: list[tuple[int, int]] = []
    for start, end in spans:
        if out and start - out[-1][1] <= gap and end - out[-1][0] <= RANGE_MOST:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


if __name__ == "__main__":
    main()
