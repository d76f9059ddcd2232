"""Memory at 256 px: peak RSS of one fp32 training step at batch 1 with gradient checkpointing.

    PYTHONPATH=. python tools/bench/memory.py

Each case runs in a fresh process (peak RSS is a high-water mark), builds the model of its config at
256 px, takes one step (forward, backward, AdamW: weights, gradients and both moments are resident)
and reports its own ru_maxrss; the RSS after imports alone is printed beside it, and the planner's
peak of live tensors for the same step (tools/plan_memory.py, fake tensors; + weights and AdamW moments):
RSS above imports + tensors is the allocator's (freed memory glibc keeps; the trainer fixes glibc's
mmap threshold on the CPU, dist_vae/host_memory.py, and so does each case here). Target: <= 4 GiB.
The PixelVAE uses configs/lsun_64_pixelvae.yaml's model (the schema's PixelCNN++ sizes) at 256 px.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from dist_vae.compat.torch_ops import FakeTensorMode
from dist_vae.config import load_config
from dist_vae.host_memory import return_large_blocks_to_os
from dist_vae.models import build_model
from tools.bench.gpu import TrainStep
from tools.plan_memory import peak_step_bytes

ROOT = Path(__file__).resolve().parents[2]
CASES = {"pixel_vae": "configs/lsun_64_pixelvae.yaml", "iterative_vae": "configs/lsun_256_iterative.yaml"}
TARGET_GIB = 4.0


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def tensor_peak_gib(config: str, resolution: int, precision: str) -> float:
    """Planner's figure: weights + AdamW moments + the step's live-tensor peak (gradients included)."""
    with FakeTensorMode():
        model = build_model(load_config(ROOT / config).model, resolution, gradient_checkpointing=True)
        peak = peak_step_bytes(model, resolution, 1, precision)
    return (peak + 12 * sum(p.numel() for p in model.parameters())) / 2**30


def one_step(config: str, resolution: int, precision: str) -> dict[str, float]:
    """In this process: one training step; the peak RSS before it (imports) and after it."""
    before = rss_gib()
    return_large_blocks_to_os()  # as the trainer does on the CPU
    cfg = load_config(ROOT / config)
    torch.manual_seed(0)
    model = build_model(cfg.model, resolution, gradient_checkpointing=True)
    step = TrainStep(model, precision, torch.device("cpu"), None)
    started = time.perf_counter()
    loss = step(torch.rand(1, 3, resolution, resolution) * 2 - 1, 0)
    params = sum(p.numel() for p in model.parameters())
    return {"imports": before, "peak": rss_gib(), "seconds": time.perf_counter() - started,
            "params": params, "loss": float(loss)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--models", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)  # the child's side
    args = parser.parse_args()
    if args.case:
        print(json.dumps(one_step(CASES[args.case], args.resolution, args.precision)))
        return
    print(f"one {args.precision} training step, batch 1, {args.resolution} px, checkpointing, own process")
    print(f"{'model':<15}{'params':>9}{'imports':>10}{'tensors':>10}{'peak RSS':>10}{'step s':>8}  target")
    for kind in args.models:
        child = subprocess.run(
            [sys.executable, __file__, "--case", kind, "--resolution", str(args.resolution),
             "--precision", args.precision],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        r = json.loads(child.stdout.splitlines()[-1])
        tensors = tensor_peak_gib(CASES[kind], args.resolution, args.precision)
        verdict = "ok" if r["peak"] <= TARGET_GIB else "OVER"
        cells = f"{r['params'] / 1e6:>8.1f}M{r['imports']:>9.2f}G{tensors:>9.2f}G{r['peak']:>9.2f}G"
        print(f"{kind:<15}{cells}{r['seconds']:>8.1f}  <= {TARGET_GIB:.0f} GiB {verdict}", flush=True)


if __name__ == "__main__":
    main()
