"""Benchmark: PixelCNN++ training step with and without gradient checkpointing, side by side.

    PYTHONPATH=. python tools/bench/pixelcnnpp.py [--filters 64 160] [--repeats 2] [--device cpu]

For each width it builds the same conditional PixelCNN++ (nr_resnet=5, nr_mix=10, n_stages=3,
cond_dim=64, dropout 0.5) twice, with identical weights, and measures on a 32 px batch of 8:
- step time: wall time of forward + backward + Adam step, best of --repeats after one warm-up step,
  the two variants' steps interleaved (on a shared machine pass --threads 1: OpenMP barriers with
  more threads than free cores turn a busy neighbour into 10x swings);
- memory: on CUDA, torch.cuda.max_memory_allocated above what was allocated before the step; on
  CPU (which keeps no allocator statistics) the profiler's allocation events (profile_memory=True:
  every allocation and free of the CPU allocator, with its size), summed in time order. Two numbers:
  'saved' = bytes still live when the forward pass returns (the activations kept for backward), and
  'peak' = the highest live total during forward + backward (activations, recomputed activations,
  gradients of activations and of the weights), both relative to the start of the step.
Then it prints the ratios checkpointed / plain; the targets are peak <= 0.4x at <= 1.35x time.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dist_vae.models import logistic_mixture as lm
from dist_vae.models.pixelcnnpp import PixelCNNpp

MB = 2**20


def build(filters: int, checkpointing: bool, device: torch.device) -> PixelCNNpp:
    torch.manual_seed(0)
    return PixelCNNpp(5, filters, 10, 3, cond_dim=64, dropout=0.5, gradient_checkpointing=checkpointing).to(
        device
    )


def forward_loss(model: PixelCNNpp, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return -lm.log_prob(x, model(x, z)).mean() / x[0].numel()


def train_step(model: PixelCNNpp, opt: torch.optim.Optimizer, x: torch.Tensor, z: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    forward_loss(model, x, z).backward()
    opt.step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def step_seconds(models: list[PixelCNNpp], x: torch.Tensor, z: torch.Tensor, repeats: int) -> list[float]:
    """Best step time of each model. Steps alternate between the models so that a change in the
    machine's load (a shared CPU) falls on both alike; one warm-up step each is not counted."""
    opts = [torch.optim.Adam(m.parameters(), lr=1e-4) for m in models]
    for model, opt in zip(models, opts, strict=True):
        train_step(model, opt, x, z)
    best = [float("inf")] * len(models)
    for _ in range(repeats):
        for i, (model, opt) in enumerate(zip(models, opts, strict=True)):
            best[i] = min(best[i], train_step(model, opt, x, z))
    return best


def memory_cpu(model: PixelCNNpp, x: torch.Tensor, z: torch.Tensor) -> tuple[float, float]:
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.profiler.record_function("forward_done_marker"):
            loss = forward_loss(model, x, z)
        loss.backward()
    events = prof.profiler.kineto_results.events()
    forward_end = max(e.end_ns() for e in events if e.name() == "forward_done_marker")
    live = peak = saved = 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
        if e.start_ns() <= forward_end:
            saved = live
    return saved / MB, peak / MB


def memory_cuda(model: PixelCNNpp, x: torch.Tensor, z: torch.Tensor) -> tuple[float, float]:
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = forward_loss(model, x, z)
    saved = torch.cuda.memory_allocated() - base
    loss.backward()
    torch.cuda.synchronize()
    return saved / MB, (torch.cuda.max_memory_allocated() - base) / MB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filters", type=int, nargs="+", default=[64, 160])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = (
        torch.randint(0, 256, (args.batch, 3, args.resolution, args.resolution), generator=g) / 127.5 - 1
    ).to(device)
    z = torch.randn(args.batch, 64, generator=g).to(device)
    memory = memory_cuda if device.type == "cuda" else memory_cpu
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} px={args.resolution}")
    header = f"{'filters':>7} {'ckpt':>5} {'img/s':>8} {'step s':>8} {'saved MB':>9} {'peak MB':>9}"
    rows, ratios = [header], []
    for filters in args.filters:
        models = [build(filters, ckpt, device) for ckpt in (False, True)]
        seconds = step_seconds(models, x, z, args.repeats)
        memories = [memory(model, x, z) for model in models]
        for ckpt, sec, (saved, peak) in zip((False, True), seconds, memories, strict=True):
            speed = args.batch / sec
            rows.append(f"{filters:>7} {ckpt!s:>5} {speed:>8.2f} {sec:>8.2f} {saved:>9.1f} {peak:>9.1f}")
            print(rows[-1], flush=True)
        (s0, p0), (s1, p1) = memories
        ratios.append(
            f"{filters:>7} time x{seconds[1] / seconds[0]:.2f}  saved x{s1 / s0:.2f}  peak x{p1 / p0:.2f}"
        )
        del models
    print("\n".join(["", *rows, "", "checkpointed / plain:", *ratios]))


if __name__ == "__main__":
    main()
