"""Memory and throughput planner: parameters, FLOPs and memory per image, and the largest batch a GPU holds.

    PYTHONPATH=. python tools/plan_memory.py --config configs/lsun_256_iterative.yaml --gpu-mem 80GiB

Nothing is computed for real: the model runs once per measurement on fake tensors (shapes only), so
the planner takes seconds on a laptop for any model size. FLOPs come from FlopCounterMode
(dist_vae/flops.py). Activation memory is the peak of the bytes held by live tensors during one
forward + backward, tracked op by op; its slope between two batch sizes is the cost of one more
image, its intercept what every step holds whatever the batch (gradients, autocast weight copies).
Weights, AdamW moments and the EMA copy are added per parameter (fp32). The GPU's own overheads (CUDA
context, allocator fragmentation) are covered by --headroom.

Step time: max(arithmetic at a stated MFU, host floor) in eager, compiled and graphed execution, the
regime, and the smallest per-GPU batch that is compute-bound (dist_vae/step_time.py states the model
and its constants). The operations per step are counted on fake tensors too.
"""

from __future__ import annotations

import argparse
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_vae.compat.torch_ops import FakeTensorMode, TorchDispatchMode, tree_leaves
from dist_vae.config import ConfigError, load_config
from dist_vae.flops import flops_per_image, lookup_peak, run_step, without_checkpointing
from dist_vae.models import build_model
from dist_vae.precision import DTYPES
from dist_vae.step_time import MFU, MODES, operations_per_step, predict

UNITS = {"": 1, "B": 1, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}
MEASURE_BATCHES = (2, 4)


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of every storage an op creates until it is freed, and the peak of their sum.

    Storages present before (`known`, e.g. the parameters) are not counted. A storage's Python object
    lives exactly as long as the storage itself, so a weakref finalizer marks the moment it is freed.
    """

    def __init__(self, known: list[torch.Tensor]) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._ids = {id(t.untyped_storage()) for t in known}
        self._keep = [t.untyped_storage() for t in known]  # so their ids are not reused

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._ids:
            return
        self._ids.add(key)
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._ids.discard(key)
        self.live -= size


def peak_step_bytes(model: nn.Module, resolution: int, batch: int, precision: str = "fp32") -> int:
    """Peak bytes of the tensors created by one forward + backward of `model` at `batch`, beyond its
    parameters; `model` may live in a FakeTensorMode (then nothing is computed), x is made there too."""
    x = torch.empty(batch, 3, resolution, resolution)
    autocast = torch.autocast("cpu", dtype=DTYPES[precision], enabled=precision != "fp32")
    with autocast, LiveBytes([*model.parameters(), *model.buffers()]) as tracker:
        run_step(model, x, None, training=True)
    return tracker.peak


@dataclass
class Activations:
    per_image: float  # bytes each extra image adds to the step's peak
    fixed: float  # bytes of the step's peak that do not grow with the batch

    def at(self, batch: int) -> float:
        return self.fixed + batch * self.per_image


def activations(model: nn.Module, resolution: int, precision: str) -> Activations:
    """Slope and intercept of the step's peak memory over the batch size."""
    low, high = MEASURE_BATCHES
    peaks = [peak_step_bytes(model, resolution, b, precision) for b in (low, high)]
    per_image = (peaks[1] - peaks[0]) / (high - low)
    return Activations(per_image, peaks[0] - low * per_image)


def parse_bytes(text: str) -> int:
    """'80GiB', '40 GB', '1.5e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in UNITS:
        raise ValueError(f"bad memory size {text!r}; expected a number and a unit such as 80GiB or 40GB")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def state_bytes(params: int, ema: bool) -> int:
    """fp32 weights + AdamW's two moments (+ the EMA copy): what the optimizer state costs per GPU."""
    return params * 4 * (3 + int(ema))


def largest_batch(budget: float, static: float, acts: Activations) -> int:
    """The largest batch whose step fits `budget` bytes (0 when not even one image fits)."""
    if acts.per_image <= 0:
        return 0
    return max(0, int((budget - static - acts.fixed) // acts.per_image))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--gpu-mem", default="80GiB", help="memory per GPU, e.g. 80GiB, 141GB")
    parser.add_argument("--precision", choices=sorted(DTYPES), default=None, help="default: train.precision")
    parser.add_argument("--headroom", type=float, default=0.1, help="fraction kept free (context, fragments)")
    parser.add_argument("--gpu", default="H100", help="GPU name for the datasheet peak (dist_vae/flops.py)")
    parser.add_argument("--peak", type=float, default=None, help="peak FLOP/s (default: --gpu's datasheet)")
    parser.add_argument("--gpus", type=int, default=None, help="GPU count the global batch is shared by")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        budget = parse_bytes(args.gpu_mem) * (1.0 - args.headroom)
    except (ConfigError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    precision = args.precision or cfg.train.precision
    resolution = cfg.data.resolution
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, resolution, gradient_checkpointing=True)
    params = sum(p.numel() for p in model.parameters())
    flops = flops_per_image(model, resolution)
    with FakeTensorMode():
        fake = build_model(cfg.model, resolution, gradient_checkpointing=True)
        with without_checkpointing(fake):
            plain = activations(fake, resolution, precision)
        ckpt = activations(fake, resolution, precision)
    static = state_bytes(params, cfg.train.ema_decay > 0)
    current = "on" if cfg.train.gradient_checkpointing else "off"
    print(
        f"{args.config}: {cfg.model.kind} at {resolution} px, {precision}, checkpointing {current} in config"
    )
    print(f"parameters                 {params / 1e6:10.2f} M")
    print(f"FLOPs per image            {flops / 1e9:10.2f} GFLOP  (forward + backward, no recompute)")
    print(f"activations per image      {plain.per_image / 2**20:10.1f} MiB  (no checkpointing)")
    print(f"                           {ckpt.per_image / 2**20:10.1f} MiB  (gradient checkpointing)")
    print(
        f"per step, any batch        {_gib(plain.fixed)} / {_gib(ckpt.fixed)}  (grads, casts; plain / ckpt)"
    )
    print(f"weights + AdamW + EMA      {_gib(static)}  (fp32, not sharded)")
    print(f"largest batch per GPU in {args.gpu_mem} ({args.headroom:.0%} kept free): "
          f"{largest_batch(budget, static, plain)} without checkpointing, "
          f"{largest_batch(budget, static, ckpt)} with")  # fmt: skip
    batch = cfg.data.batch_size
    used = ckpt if cfg.train.gradient_checkpointing else plain
    print(f"the config's batch {batch} needs {_gib(static + used.at(batch))} per GPU")
    peak = args.peak or lookup_peak(args.gpu, DTYPES[precision]) or 0.0
    if peak:
        fits = largest_batch(budget, static, used)
        checkpointing = cfg.train.gradient_checkpointing
        ops = operations_per_step(lambda: build_model(cfg.model, resolution, checkpointing), resolution)
        step_time(ops, flops, batch, peak, fits, args.gpus, cfg)


def step_time(ops: int, flops: float, batch: int, peak: float, fits: int, gpus: int | None, cfg: Any) -> None:
    """The predicted step per execution mode at the config's batch, and the batch that is compute-bound."""
    accumulate = cfg.train.accumulate
    print(f"operations per step        {ops:10,d}  (aten, batch-independent; peak {peak / 1e12:.0f} TFLOP/s, "
          f"MFU {MFU:.0%} when compute-bound)")  # fmt: skip
    for mode in MODES:
        p = predict(ops, flops, batch, peak, mode)
        size = f"smallest compute-bound batch {p.min_batch}" + (
            "" if p.min_batch <= fits else " (does not fit)"
        )
        print(f"  {mode:9s} floor {p.floor_s * 1e3:8.1f} ms  arithmetic {p.compute_s * 1e3:8.1f} ms  "
              f"-> {p.regime:13s} MFU {p.mfu:6.1%}  {size}")  # fmt: skip
    if gpus:
        print(f"global batch {batch * gpus * accumulate} = {batch} per GPU x {gpus} GPUs x {accumulate}")


if __name__ == "__main__":
    main()
