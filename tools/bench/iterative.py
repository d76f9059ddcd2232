"""Benchmark: IterativeVAE training-step time and peak activation memory, with and without checkpointing.

Runs every (resolution, checkpointing) pair in one process, side by side, and prints the table plus
the checkpointed/plain ratios per resolution.

Memory method: one forward+backward runs under torch.profiler with profile_memory=True; every
allocation and free the c10 allocator makes is recorded with the running total of bytes allocated
since the profiler started, and the peak of that running total is reported. The weights, gradients
and Adam state already exist when profiling starts (a warm-up step creates them and zero_grad keeps
the gradient buffers), so the peak is the memory a step adds on top of the model's resident state:
saved activations, recomputed activations during backward (with checkpointing) and transient
gradient buffers. This works on CPU (where torch.cuda.max_memory_allocated does not) and on GPU.

Step time: full steps (forward, backward, Adam) after a warm-up step, plain and checkpointed
alternating; the minimum over --iters is the figure least disturbed by other load on a shared machine
(the median is printed beside it).

Example: PYTHONPATH=. python tools/bench/iterative.py            # on the CPU
         PYTHONPATH=. python tools/bench/iterative.py --channels 64 --device cuda   # LSUN-256 widths
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from dist_vae.models.iterative_vae import IterativeVAE, IterativeVAEConfig


def peak_step_bytes(model: IterativeVAE, x: torch.Tensor, device: torch.device) -> int:
    """Peak bytes allocated during one forward+backward above what existed before it (see module doc)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        model(x, step=1000).loss.backward()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    device_type = 1 if device.type == "cuda" else 0  # c10::DeviceType: CPU = 0, CUDA = 1
    totals = [
        e["args"]["Total Allocated"]
        for e in events
        if e.get("name") == "[memory]" and e["args"].get("Device Type") == device_type
    ]
    if not totals:
        raise RuntimeError("the profiler recorded no memory events; is profile_memory supported here?")
    return max(totals)


def measure(args: argparse.Namespace, resolution: int, batch: int) -> dict[bool, dict[str, float]]:
    """Plain and checkpointed copies of one model (same weights), timed alternately so that load from
    other processes hits both alike."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = IterativeVAEConfig(refine_steps=args.steps, channels=args.channels)
    plain = IterativeVAE(cfg, resolution).to(device)
    ckpt = IterativeVAE(cfg, resolution, gradient_checkpointing=True)
    ckpt.to(device).load_state_dict(plain.state_dict())
    models = {False: plain, True: ckpt}
    opts = {c: torch.optim.Adam(m.parameters(), lr=1e-4) for c, m in models.items()}
    x = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1

    def train_step(checkpointing: bool) -> float:
        start = time.perf_counter()
        opts[checkpointing].zero_grad(set_to_none=False)
        models[checkpointing](x, step=1000).loss.backward()
        opts[checkpointing].step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for checkpointing in models:
        train_step(checkpointing)  # warm-up: allocates gradients and Adam state
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.iters):
        for checkpointing in models:
            times[checkpointing].append(train_step(checkpointing))
    results = {}
    for checkpointing, model in models.items():
        opts[checkpointing].zero_grad(set_to_none=False)
        results[checkpointing] = {
            "time": min(times[checkpointing]),
            "median": statistics.median(times[checkpointing]),
            "peak": peak_step_bytes(model, x, device) / 2**20,
            "params": sum(p.numel() for p in model.parameters()) / 1e6,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 1], help="batch per resolution")
    parser.add_argument("--steps", type=int, default=8, help="refinement steps T")
    parser.add_argument("--channels", type=int, default=16, help="model.channels (LSUN default: 64)")
    parser.add_argument("--iters", type=int, default=2, help="timed steps per configuration")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if len(args.batch) != len(args.resolutions):
        parser.error("--batch needs one value per --resolutions entry")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"IterativeVAE: T={args.steps}, channels={args.channels}, latents 20/30/30/30, device={args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    header = (
        f"{'res':>5} {'batch':>5} {'ckpt':>5} {'params(M)':>10} {'step min(s)':>12} {'median(s)':>10} "
        f"{'peak act(MiB)':>14}"
    )
    print(header)
    print("-" * len(header))
    results = {}
    for resolution, batch in zip(args.resolutions, args.batch, strict=True):
        for checkpointing, r in measure(args, resolution, batch).items():
            results[resolution, checkpointing] = r
            print(
                f"{resolution:>5} {batch:>5} {'on' if checkpointing else 'off':>5} {r['params']:>10.2f} "
                f"{r['time']:>12.2f} {r['median']:>10.2f} {r['peak']:>14.1f}",
                flush=True,
            )
    print("\ncheckpointing on / off:")
    for resolution in args.resolutions:
        on, off = results[resolution, True], results[resolution, False]
        print(
            f"  {resolution:>4} px: step time (min) x{on['time'] / off['time']:.2f}, "
            f"peak activation memory x{on['peak'] / off['peak']:.2f}"
        )


if __name__ == "__main__":
    main()
