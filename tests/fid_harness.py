"""Sample quality of a seeded, untrained tiny model, run as one process or under `accelerate launch`.

    python tests/fid_harness.py SHARDS OUT.json   (or: accelerate launch ... tests/fid_harness.py ...)

The main process writes {way: numbers} to OUT.json; tests/test_fid.py compares one and two processes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dist_vae.config import Config, load_config  # noqa: E402
from dist_vae.distributed import tool_state  # noqa: E402
from dist_vae.metrics.sample_quality import quality_by_way  # noqa: E402
from dist_vae.metrics.settings import EvalConfig  # noqa: E402
from dist_vae.models import build_model  # noqa: E402

N, BATCH = 8, 2  # 4 chunks: 2 per rank under two processes


def config(shards: Path) -> Config:
    overrides = ["data.resolution=16", "data.num_workers=0", "model.kind=iterative_vae",
                 "model.refine_steps=2", "model.latent_dims=[2,2]", "model.channels=4"]  # fmt: skip
    return load_config(ROOT / "configs" / "debug.yaml", [f"data.path={shards}", *overrides])


def quality(shards: Path) -> dict[str, dict[str, float]]:
    """Every rank builds the same model from the seed, samples and embeds its share."""
    cfg = config(shards)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.resolution, False)
    eval_cfg = EvalConfig(fid_samples=N, batch_size=BATCH, kid_subsets=10)
    return quality_by_way(model, cfg.data, "train", eval_cfg, seed=0)


if __name__ == "__main__":
    state = tool_state()
    result = quality(Path(sys.argv[1]))
    if state.is_main_process:
        Path(sys.argv[2]).write_text(json.dumps(result))
    state.wait_for_everyone()
