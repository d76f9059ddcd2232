"""Benchmark: training-step time of this tree against main at bf2ea00, side by side in one run.

    PYTHONPATH=. python tools/bench/speed.py [--rounds 3] [--steps 3] [--threads 2] [--cases ...]

bf2ea00 is checked out into a temporary git worktree (removed afterwards), so no old code lives in
this tree; where the git history is missing (a copy of the tree on a GPU machine), pass a checkout
made elsewhere with --baseline-tree (`git archive bf2ea00 | tar -x -C DIR`). tools/bench/gpu.py runs
this on the GPU. Each case is timed in fresh subprocesses that alternate between the two trees round by
round (each imports its own tree's dist_vae through PYTHONPATH, takes one warm-up step, then times
--steps steps and reports their median); the ratio printed is the median over rounds of
old / new (> 1: this tree is faster), beside the issue's target. On a shared machine the absolute
times move with the neighbours' load; alternating rounds lets that load fall on both trees alike.

Cases (eager, fp32, forward + backward + Adam): PixelCNN++ at the seed's CIFAR architecture
(nr_resnet=5, 3 stages, 10 mixtures, dropout 0.5, cond_dim 64) with 64 and 160 filters, 32 px,
batch 8, with and without gradient checkpointing; the iterative VAE at configs/demo_iterative.yaml
and at configs/lsun_256_iterative.yaml with batch 1 (gradient checkpointing on).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASELINE = "bf2ea00"
# name: (worker arguments, target ratio old / new)
CASES = {
    "pixelcnnpp-64": (["pixelcnnpp", "64"], 1.35),
    "pixelcnnpp-160": (["pixelcnnpp", "160"], 1.35),
    "pixelcnnpp-64-ckpt": (["pixelcnnpp", "64", "ckpt"], 1.2),
    "pixelcnnpp-160-ckpt": (["pixelcnnpp", "160", "ckpt"], 1.2),
    "iterative-demo": (["iterative", "configs/demo_iterative.yaml"], 1.3),
    "iterative-256-b1-ckpt": (["iterative", "configs/lsun_256_iterative.yaml", "data.batch_size=1"], 1.3),
}


def pixelcnnpp_step(device: str, filters: int, checkpointing: bool):
    """A PixelCNN++ training step through the API both trees share."""
    import torch

    from dist_vae.models import logistic_mixture as lm
    from dist_vae.models.pixelcnnpp import PixelCNNpp

    torch.manual_seed(0)
    model = PixelCNNpp(5, filters, 10, 3, cond_dim=64, dropout=0.5, gradient_checkpointing=checkpointing)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = (torch.randint(0, 256, (8, 3, 32, 32)) / 127.5 - 1).to(device)
    z = torch.randn(8, 64).to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        (-lm.log_prob(x, model(x, z)).mean()).backward()
        optimizer.step()

    return step


def iterative_step(device: str, config: str, *overrides: str):
    """An iterative-VAE training step at a config (its own gradient-checkpointing setting)."""
    import torch

    from dist_vae.config import load_config
    from dist_vae.models import build_model

    cfg = load_config(Path(config), list(overrides))  # the tree under test is the working directory
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.resolution, cfg.train.gradient_checkpointing).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = (torch.rand(cfg.data.batch_size, 3, cfg.data.resolution, cfg.data.resolution) * 2 - 1).to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(x, step=1000).total().backward()
        optimizer.step()

    return step


def counts(step: Callable[[], None], device: str) -> dict[str, float]:
    """What one step asks of the hardware, whatever the device: allocations and the bytes they hold
    (the profiler's allocator events), and operator calls (on a GPU: kernel launches)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, profile_memory=True) as prof:
        step()
    events = prof.profiler.kineto_results.events()
    allocations = [e.nbytes() for e in events if e.name() == "[memory]" and e.nbytes() > 0]
    if cuda:
        launches = sum(1 for e in events if e.device_type().name == "CUDA" and e.name() != "[memory]")
    else:
        launches = sum(1 for e in events if e.name().startswith("aten::"))
    return {"allocations": len(allocations), "alloc_mb": sum(allocations) / 2**20, "launches": launches}


def worker(args: list[str], steps: int, threads: int, device: str) -> None:
    """Runs in the subprocess: prints the median seconds of `steps` steps after one warm-up, and the
    counts of one more step, as JSON."""
    import torch

    torch.set_num_threads(threads)
    kind, *rest = args
    if kind == "pixelcnnpp":
        step = pixelcnnpp_step(device, int(rest[0]), rest[1:] == ["ckpt"])
    else:
        step = iterative_step(device, *rest)

    def timed() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started

    step()
    seconds = statistics.median(timed() for _ in range(steps))
    print(json.dumps({"seconds": seconds, **counts(step, device)}))


def run_tree(tree: Path, case: list[str], args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", *case]
    command += ["--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device]
    out = subprocess.run(command, env=env, cwd=tree, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@contextlib.contextmanager
def baseline_tree(given: Path | None) -> Iterator[Path]:
    """The bf2ea00 tree: --baseline-tree as given, else a temporary git worktree removed afterwards."""
    if given is not None:
        yield given
        return
    tmp = tempfile.mkdtemp()
    tree = Path(tmp) / BASELINE
    git = ["git", "-C", str(ROOT), "worktree"]
    added = subprocess.run(
        [*git, "add", "--detach", "-q", str(tree), BASELINE], capture_output=True, text=True
    )
    if added.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        why = added.stderr.strip()
        sys.exit(f"speed.py: error: cannot check out {BASELINE} into a git worktree ({why}); without the "
                 f"repository's history pass --baseline-tree DIR (a `git archive {BASELINE}`)")  # fmt: skip
    try:
        yield tree
    finally:
        subprocess.run([*git, "remove", "--force", str(tree)], check=True)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--device", default="cpu", help="cuda on a GPU machine (make bench-gpu)")
    parser.add_argument(
        "--baseline-tree", type=Path, help=f"a checkout of {BASELINE} to use instead of a worktree"
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.threads, args.device)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a stopped run still removes its worktree
    removed = []
    with baseline_tree(args.baseline_tree) as baseline:
        load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the start"
        print(f"{args.device}, {args.threads} threads, median of {args.steps} steps, {args.rounds} "
              f"alternating rounds; {load}")  # fmt: skip
        print(f"{'case':<24}{BASELINE + ' s':>12}{'this s':>10}{'ratio':>8}{'target':>8}  per round")
        for name in args.cases:
            case, target = CASES[name]
            runs: dict[Path, list[dict[str, float]]] = {baseline: [], ROOT: []}
            for r in range(args.rounds):  # alternate which tree goes first
                for tree in (baseline, ROOT) if r % 2 == 0 else (ROOT, baseline):
                    runs[tree].append(run_tree(tree, case, args))
            old, new = ([run["seconds"] for run in runs[t]] for t in (baseline, ROOT))
            ratios = [o / n for o, n in zip(old, new, strict=True)]
            each = " ".join(f"{x:.2f}" for x in ratios)
            print(f"{name:<24}{statistics.median(old):>12.3f}{statistics.median(new):>10.3f}"
                  f"{statistics.median(ratios):>8.2f}{target:>8.2f}  {each}", flush=True)  # fmt: skip
            before, after = runs[baseline][-1], runs[ROOT][-1]
            removed.append(f"{name:<24}" + "".join(
                f"{before[k]:>11.0f} ->{after[k]:>7.0f}" for k in ("allocations", "alloc_mb", "launches")
            ))  # fmt: skip
    launches = "kernels" if args.device.startswith("cuda") else "aten ops"
    print(f"\nper step, {BASELINE} -> this tree (device-independent: what a GPU is spared too)")
    print(f"{'case':<24}{'allocations':>20}{'MB allocated':>20}{launches:>20}")
    print("\n".join(removed))


if __name__ == "__main__":
    main()
