"""The data layer's configuration: the `data` section of a run config, beside the stream it drives."""

from __future__ import annotations

from dataclasses import dataclass

from dist_vae.schema import at_least


@dataclass
class DataConfig:
    path: str = "data/demo/shards"  # directory or s3:// gs:// az:// https:// URL of the shards + manifest
    resolution: int = at_least(32, 8)  # <= the shards' resolution; smaller is resized on the fly
    batch_size: int = at_least(16, 1)  # per-rank micro-batch; x world size x train.accumulate per update
    num_workers: int = at_least(2, 0)  # DataLoader workers per rank; a resumed run may change it
    shuffle_group: int = at_least(8, 1)  # shards whose samples are mixed together in an epoch
    random_flip: bool = True
    cache_dir: str = ""  # node-local cache of a URL's shards; "" = $TMPDIR/dist-vae-shards/<hash of the URL>
    cache_bytes: int = at_least(16 << 30, 1)  # the cache's budget; at least the largest shard
    remote_retries: int = at_least(8, 0)  # retries of a transient object-store error, per request
    remote_timeout_s: float = at_least(60.0, 1.0)  # deadline of one object-store request
