"""The data layer's configuration: the `data` section of a run config, beside the stream it drives."""

from __future__ import annotations

from dataclasses import dataclass

from dist_vae.schema import at_least


@dataclass
class DataConfig:
    path: str = "data/demo/shards"  # directory holding train-*.tar, val-*.tar and manifest.json
    resolution: int = at_least(32, 8)  # <= the shards' resolution; smaller is resized on the fly
    batch_size: int = at_least(16, 1)  # per-rank micro-batch; x world size x train.accumulate per update
    num_workers: int = at_least(2, 0)  # DataLoader workers per rank; a resumed run may change it
    shuffle_group: int = at_least(8, 1)  # shards whose samples are mixed together in an epoch
    random_flip: bool = True
