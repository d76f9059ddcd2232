"""torch.compile on this machine: eager vs compiled (inductor) training-step time for both models.

    PYTHONPATH=. python tools/bench/compile.py

Both models at the demo configs' sizes (configs/debug.yaml, configs/demo_iterative.yaml). The two
sides are identical copies of one model; after warm-up (which includes compilation, reported) they
take steps in alternating rounds and each side's best round is kept. A ratio below 1 means compile
helps; train.compile should default to on only where it does. Inductor caches compiled graphs on
disk (/tmp/torchinductor_$USER), which makes a second run compile much faster, so each run here
compiles into a fresh temporary cache and reports what a new run on a new machine pays.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from dist_vae.config import load_config
from dist_vae.models import build_model
from tools.bench.gpu import TrainStep

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"pixel_vae": "configs/debug.yaml", "iterative_vae": "configs/demo_iterative.yaml"}


def seconds_per_step(step: TrainStep, x: torch.Tensor, steps: int) -> float:
    started = time.perf_counter()
    for i in range(steps):
        step(x, i)
    return (time.perf_counter() - started) / steps


def compare(kind: str, steps: int, rounds: int) -> tuple[float, float, float]:
    """(eager s/step, compiled s/step, compilation s) for `kind` at its demo config."""
    cfg = load_config(ROOT / CONFIGS[kind])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.resolution)
    cpu = torch.device("cpu")
    eager = TrainStep(model, "fp32", cpu, None)
    compiled = TrainStep(copy.deepcopy(model), "fp32", cpu, "inductor")
    x = torch.rand(cfg.data.batch_size, 3, cfg.data.resolution, cfg.data.resolution) * 2 - 1
    started = time.perf_counter()
    compiled(x, 0)
    build = time.perf_counter() - started
    eager(x, 0)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(rounds):
        times["eager"].append(seconds_per_step(eager, x, steps))
        times["compiled"].append(seconds_per_step(compiled, x, steps))
    return min(times["eager"]), min(times["compiled"]), build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(
        f"fp32 training steps on {torch.get_num_threads()} CPU threads, best of {args.rounds} x {args.steps}"
    )
    print(f"{'model':<15}{'eager ms':>10}{'compiled ms':>13}{'compile s':>11}  compiled/eager")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # read when inductor compiles
        for kind in CONFIGS:
            eager, compiled, build = compare(kind, args.steps, args.rounds)
            print(f"{kind:<15}{eager * 1e3:>10.1f}{compiled * 1e3:>13.1f}{build:>11.0f}  "
                  f"{compiled / eager:.2f}   (< 1: compile helps)")  # fmt: skip


if __name__ == "__main__":
    main()
