"""Reading shards from an object store against reading them locally, side by side.

    PYTHONPATH=. python tools/bench/remote.py --images 2000 --epochs 1

Starts moto's S3 server on 127.0.0.1 behind the tests' proxy (tests/remote_fixtures.py) with
`--latency-ms` added per request, builds demo shards, uploads them, and iterates the train stream
over `--epochs` epochs from the URL (cold cache) and from the local copy. Prints img/s of each and
their ratio, bytes downloaded / bytes of the shards used, and requests per image. The stream only:
the data-wait fraction of a training run is the trainer's `perf/data_wait_fraction` scalar.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dist_vae.data.config import DataConfig  # noqa: E402
from dist_vae.data.stream import ShardStream  # noqa: E402
from tests.data_fixtures import make_demo_shards  # noqa: E402
from tests.remote_fixtures import FaultyProxy, create_bucket, moto_server, s3_env, upload_dir  # noqa: E402


def rate(cfg: DataConfig, images: int, batch: int) -> tuple[float, ShardStream]:
    stream = ShardStream(cfg, seed=0, batch_size=batch)
    started = time.perf_counter()
    for _ in islice(stream, images // batch):
        pass
    return images // batch * batch / (time.perf_counter() - started), stream


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, moto_server() as port:
        local = make_demo_shards(
            Path(tmp) / "shards", args.images, 32, 0.0, "--shard-size", str(args.shard_size)
        )
        create_bucket(port, "bench")
        upload_dir(port, local, "s3://bench/shards")
        proxy = FaultyProxy(port, rate=args.fail_rate, delay_s=args.latency_ms / 1000)
        os.environ.update(s3_env(proxy.url))
        common = {"resolution": 32, "num_workers": args.workers, "shuffle_group": 4}
        n = int(args.images * args.epochs)
        remote_cfg = DataConfig(path="s3://bench/shards", cache_dir=str(Path(tmp) / "cache"), **common)
        remote, stream = rate(remote_cfg, n, args.batch)
        local_rate, _ = rate(DataConfig(path=str(local), **common), n, args.batch)
        manifest = json.loads((local / "manifest.json").read_text())
        shard_bytes = manifest["splits"]["train"]["bytes"]
        used = shard_bytes * min(1.0, args.epochs)
        requests = sum(proxy.requests.values())
        shards, ratio = len(manifest["splits"]["train"]["shards"]), remote / local_rate
        print(f"images {n}, shards {shards}, +{args.latency_ms:g} ms/request")
        print(f"img/s local {local_rate:.0f}, remote {remote:.0f}, remote/local {ratio:.2f} (target >= 0.95)")
        print(
            f"bytes downloaded / bytes used {stream.remote['bytes'] / used:.3f} (target <= 1.1); "
            f"retries {stream.remote['retries']}; requests per image {requests / n:.4f}"
        )
        proxy.close()


if __name__ == "__main__":
    main()
