"""Engine overhead: the trainer's step rate vs a bare PyTorch loop, same model, data and optimizer.

    PYTHONPATH=. python tools/bench/engine.py --config configs/debug.yaml --steps 40

Both loops take batches from the same ShardStream and run forward, backward, clipping, AdamW and
the EMA update (the features that cost real compute, on both sides or the comparison is unfair);
the engine adds accumulation bookkeeping, skip decisions, the LR schedule, logging and the
preemption check.
Both are timed the same way: from the end of their first step to the end of their last, so start-up
(process group, DataLoader workers, the first batch) and the final checkpoint are outside the
window and everything the engine does between steps is inside it. Evaluation, sampling and periodic
checkpoints are pushed past the end. Runs alternate (bare, engine, bare, engine, ...) and the ratio
reported is the median over rounds of each engine run's time over the bare run just before it: the
two runs of a round share the machine's conditions, which on a shared VM drift by more than the
overhead being measured.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from dist_vae.config import Config, load_config
from dist_vae.data.stream import ShardStream
from dist_vae.engine.ema import EMA
from dist_vae.engine.trainer import Trainer, Update, Window, make_optimizer, per_rank_batch
from dist_vae.host_memory import return_large_blocks_to_os
from dist_vae.models import build_model
from tools.bench.steal import StealMeter


def bare_loop(cfg: Config, steps: int) -> float:
    """Seconds per step of the plainest equivalent loop."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.data.resolution, cfg.train.gradient_checkpointing)
    optimizer = make_optimizer(model, cfg)
    ema = EMA(model, cfg.train.ema_decay)
    batches = iter(ShardStream(cfg.data, "train", 0, 1, cfg.seed, batch_size=per_rank_batch(cfg)))
    stamps = []
    for step in range(steps):
        out = model(next(batches), step=step)
        out.total().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update()
        stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) / (steps - 1)


class TimedTrainer(Trainer):
    """The real trainer, noting when each training step ends."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.stamps: list[float] = []

    def _train_step(self, batches: Iterator[torch.Tensor], window: Window) -> Update:
        update = super()._train_step(batches, window)
        self.stamps.append(time.perf_counter())
        return update


def engine_loop(cfg: Config, steps: int, run_dir: Path) -> float:
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg.run_dir = str(run_dir)
    cfg.train.steps = steps
    trainer = TimedTrainer(cfg)
    trainer.fit()
    return (trainer.stamps[-1] - trainer.stamps[0]) / (steps - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/debug.yaml"))
    parser.add_argument("--steps", type=int, default=40, help="at least 2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    never = str(10**9)
    cfg = load_config(
        args.config,
        [*args.overrides, "resume=never", f"train.checkpoint_every={never}", f"train.eval_every={never}",
         f"train.sample_every={never}", "train.ema_decay=0.999"],
    )  # fmt: skip
    return_large_blocks_to_os()  # as the trainer does on the CPU: both loops run with it
    steal = StealMeter()
    bare, engine = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            bare.append(bare_loop(cfg, args.steps))
            engine.append(engine_loop(cfg, args.steps, Path(tmp) / "run"))
    ratios = sorted(e / b for b, e in zip(bare, engine, strict=True))
    b, e = statistics.median(bare), statistics.median(engine)
    images = per_rank_batch(cfg)
    shape = f"{cfg.model.kind}, {cfg.data.resolution} px, batch {images}"
    print(f"model {shape}, {args.steps} steps x {args.rounds} rounds")
    print(f"{'loop':<8}{'ms/step':>10}{'img/s':>10}   (medians over rounds)")
    print(f"{'bare':<8}{b * 1e3:>10.1f}{images / b:>10.1f}")
    print(f"{'engine':<8}{e * 1e3:>10.1f}{images / e:>10.1f}")
    ratio = statistics.median(ratios)
    overhead = f"overhead {100 * (ratio - 1):+.1f}%; rounds {ratios[0]:.3f} to {ratios[-1]:.3f}"
    print(f"engine/bare time ratio {ratio:.3f} ({overhead})   (target < 1.05)")
    print(steal.line())


if __name__ == "__main__":
    main()
