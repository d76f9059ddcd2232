"""Benchmark: training-step time of this tree against a base revision, side by side in one run.

    PYTHONPATH=. python tools/bench/speed.py --baseline REV [--rounds 3] [--threads 2] [--cases ..]
    PYTHONPATH=. python tools/bench/speed.py --baseline-tree DIR ...   # a copy without the git history

REV is checked out into a temporary git worktree (removed afterwards), so no old code lives in this
tree; where the history is missing (a copy of the tree on a GPU machine), pass a checkout made
elsewhere with --baseline-tree (`git archive REV | tar -x -C DIR`). tools/bench/gpu.py runs this on
the GPU. Each case is timed in fresh subprocesses that alternate between the two trees round by round
(each imports its own tree's dist_vae through PYTHONPATH, takes one warm-up step, then times --steps
steps and reports the fastest); the ratio printed is old / new (> 1: this tree is faster) of each
tree's fastest step over all rounds, beside the case's target and the per-round ratios. A neighbour's
load only ever adds time, so the fastest step estimates each tree's own cost; alternating rounds lets
slow spells fall on both trees alike.

Beside them: `conv`, the share of this tree's step (operator self time on the CPU, kernel time on a
GPU, from one profiled step) spent in convolutions forward and backward, and `ceiling`, ratio / conv:
the ratio this tree would reach if everything but its convolutions took no time at all. The
profiler's own per-operator cost lands outside the convolutions, so the ceiling errs high.

Cases (eager, fp32, forward + backward + optimizer): PixelCNN++ at the seed's CIFAR architecture
(nr_resnet=5, 3 stages, 10 mixtures, dropout 0.5, cond_dim 64) with 64 and 160 filters, 32 px,
batch 8, with and without gradient checkpointing, stepped by torch's default Adam; the iterative VAE
at configs/demo_iterative.yaml and at configs/lsun_256_iterative.yaml with batch 1 (gradient
checkpointing on), stepped by the trainer's AdamW as each tree builds it (`make_optimizer`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
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
# name: (worker arguments, target ratio old / new)
CASES = {
    "pixelcnnpp-64": (["pixelcnnpp", "64"], 1.35),
    "pixelcnnpp-160": (["pixelcnnpp", "160"], 1.35),
    "pixelcnnpp-64-ckpt": (["pixelcnnpp", "64", "ckpt"], 1.2),
    "pixelcnnpp-160-ckpt": (["pixelcnnpp", "160", "ckpt"], 1.2),
    "iterative-demo": (["iterative", "configs/demo_iterative.yaml"], 1.3),
    "iterative-256-b1-ckpt": (["iterative", "configs/lsun_256_iterative.yaml", "data.batch_size=1"], 1.3),
}


def pixelcnnpp_step(device: str, package: str, filters: int, checkpointing: bool):
    """A PixelCNN++ training step through the API both trees share."""
    import torch

    lm = importlib.import_module(f"{package}.models.logistic_mixture")
    PixelCNNpp = importlib.import_module(f"{package}.models.pixelcnnpp").PixelCNNpp

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


def iterative_step(device: str, package: str, tree: Path, config: str, *overrides: str):
    """An iterative-VAE training step at a config of `tree` (its own gradient-checkpointing setting
    and the trainer's optimizer)."""
    import torch

    cfg = importlib.import_module(f"{package}.config").load_config(tree / config, list(overrides))
    torch.manual_seed(0)
    build_model = importlib.import_module(f"{package}.models").build_model
    model = build_model(cfg.model, cfg.data.resolution, cfg.train.gradient_checkpointing).to(device)
    try:
        make_optimizer = importlib.import_module(f"{package}.engine.backend").make_optimizer
    except ModuleNotFoundError:  # a tree without engine/backend.py keeps it in the trainer's module
        make_optimizer = importlib.import_module(f"{package}.engine.trainer").make_optimizer
    optimizer = make_optimizer(model, cfg)  # the trainer's own AdamW, as each tree builds it
    x = (torch.rand(cfg.data.batch_size, 3, cfg.data.resolution, cfg.data.resolution) * 2 - 1).to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(x, step=1000).total().backward()
        optimizer.step()

    return step


# Dispatch layers above the convolution kernels: their own time is overhead, not convolution.
CONV_WRAPPERS = {"aten::conv2d", "aten::conv_transpose2d", "aten::convolution", "aten::_convolution"}


def counts(step: Callable[[], None], device: str) -> dict[str, float]:
    """What one step asks of the hardware, whatever the device: allocations and the bytes they hold
    (the profiler's allocator events), operator calls (on a GPU: kernel launches), and the share of
    the step's operator time (on a GPU: kernel time) spent in convolutions, forward and backward."""
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
    ops = prof.key_averages()
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    convolutions = [
        e for e in ops if e.key.startswith("aten::") and "conv" in e.key and e.key not in CONV_WRAPPERS
    ]
    conv = sum(own(e) for e in convolutions)
    return {
        "allocations": len(allocations),
        "alloc_mb": sum(allocations) / 2**20,
        "launches": launches,
        "conv_share": conv / sum(own(e) for e in ops),
    }


def case_step(case: list[str], device: str, package: str, tree: Path) -> Callable[[], None]:
    kind, *rest = case
    if kind == "pixelcnnpp":
        return pixelcnnpp_step(device, package, int(rest[0]), rest[1:] == ["ckpt"])
    return iterative_step(device, package, tree, *rest)


def timed(step: Callable[[], None], device: str) -> float:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def worker(case: list[str], steps: int, threads: int, device: str) -> None:
    """Runs in the subprocess: prints the fastest of `steps` steps after one warm-up, and the
    counts of one more step, as JSON."""
    import torch

    torch.set_num_threads(threads)
    step = case_step(case, device, "dist_vae", Path.cwd())  # the tree under test is the working directory
    step()
    seconds = min(timed(step, device) for _ in range(steps))
    print(json.dumps({"seconds": seconds, **counts(step, device)}))


def run_worker(tree: Path, flags: list[str], args: argparse.Namespace, pythonpath: str) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, str(Path(__file__).resolve()), *flags]
    command += ["--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device]
    out = subprocess.run(command, env=env, cwd=tree, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def rounds(case: list[str], baseline: Path, args: argparse.Namespace) -> dict:
    """Fresh subprocesses, alternating between the trees round by round."""
    runs: dict[Path, list[dict[str, float]]] = {baseline: [], ROOT: []}
    for r in range(args.rounds):  # alternate which tree goes first
        for tree in (baseline, ROOT) if r % 2 == 0 else (ROOT, baseline):
            runs[tree].append(run_worker(tree, ["--worker", *case], args, str(tree)))
    old, new = ([run["seconds"] for run in runs[t]] for t in (baseline, ROOT))
    each = " ".join(f"{o / n:.2f}" for o, n in zip(old, new, strict=True))
    share = statistics.median(run["conv_share"] for run in runs[ROOT])
    after = {**runs[ROOT][-1], "conv_share": share}
    return {"old": min(old), "new": min(new), "ratio": min(old) / min(new), "each": each,
            "before": runs[baseline][-1], "after": after}  # fmt: skip


@contextlib.contextmanager
def baseline_tree(revision: str | None, given: Path | None) -> Iterator[Path]:
    """The base tree: --baseline-tree as given, else `revision` in a temporary git worktree removed
    afterwards."""
    if given is not None:
        yield given
        return
    tmp = tempfile.mkdtemp()
    tree = Path(tmp) / "baseline"
    git = ["git", "-C", str(ROOT), "worktree"]
    added = subprocess.run(
        [*git, "add", "--detach", "-q", str(tree), revision], capture_output=True, text=True
    )
    if added.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        why = added.stderr.strip()
        sys.exit(f"speed.py: error: cannot check out {revision} into a git worktree ({why}); without the "
                 f"repository's history pass --baseline-tree DIR (a `git archive {revision}`)")  # fmt: skip
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
    base = parser.add_mutually_exclusive_group()
    base.add_argument("--baseline", metavar="REV", help="the git revision to compare this tree against")
    base.add_argument("--baseline-tree", type=Path, help="a checkout of it, where there is no git history")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.threads, args.device)
        return
    if args.baseline is None and args.baseline_tree is None:
        parser.error("one of --baseline REV or --baseline-tree DIR is required")
    label = args.baseline or args.baseline_tree.name
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a stopped run still removes its worktree
    removed = []
    with baseline_tree(args.baseline, args.baseline_tree) as baseline:
        load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the start"
        how = f"fastest of {args.steps} steps x {args.rounds} alternating rounds"
        print(f"{args.device}, {args.threads} threads, {how}; {load}")
        print(f"{'case':<24}{label + ' s':>12}{'this s':>10}{'ratio':>8}{'target':>8}{'conv':>8}"
              f"{'ceiling':>9}  per round")  # fmt: skip
        for name in args.cases:
            case, target = CASES[name]
            found = rounds(case, baseline, args)
            share = found["after"]["conv_share"]
            print(f"{name:<24}{found['old']:>12.3f}{found['new']:>10.3f}{found['ratio']:>8.2f}{target:>8.2f}"
                  f"{share:>8.0%}{found['ratio'] / share:>9.2f}  {found['each']}", flush=True)  # fmt: skip
            before, after = found["before"], found["after"]
            removed.append(f"{name:<24}" + "".join(
                f"{before[k]:>11.0f} ->{after[k]:>7.0f}" for k in ("allocations", "alloc_mb", "launches")
            ))  # fmt: skip
    launches = "kernels" if args.device.startswith("cuda") else "aten ops"
    print(f"\nper step, {label} -> this tree (device-independent: what a GPU is spared too)")
    print(f"{'case':<24}{'allocations':>20}{'MB allocated':>20}{launches:>20}")
    print("\n".join(removed))


if __name__ == "__main__":
    main()
