"""Engine overhead: the trainer's step time vs a bare PyTorch loop, same model, data and optimizer.

    PYTHONPATH=. python tools/bench/engine.py --config configs/debug.yaml --steps 60

Both loops take batches from their own ShardStream over the same shards and run forward, backward,
clipping, AdamW and the EMA update (the features that cost real compute, on both sides or the
comparison is unfair); the engine adds accumulation bookkeeping, skip decisions, the LR schedule,
logging, the progress bar and the preemption check.

The two loops take turns step by step in one process: before each of the trainer's steps the bare
loop takes one of its own. On a shared machine the time of one step drifts over seconds
(neighbours, the hypervisor), more than the overhead being measured, so comparing whole runs taken
one after the other would measure the machine; steps taken within a second of each other share its
conditions. An engine step is timed from the end of the bare step before it to the start of the
next bare step, so everything the engine does between steps is inside it. The first and last steps
are left out: start-up (workers, the first batch) and the final checkpoint are not throughput, and
evaluation, sampling and periodic checkpoints are pushed past the end. A pair in which either step
took over `--burst` times the round's median step is left out too and counted: such bursts hit one
side at random and, at a few per round, would move a round's ratio; the engine's own periodic work
(a log line every train.log_every steps) costs far less than a burst.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported: no progress bar between the tables

import torch

from dist_vae.config import Config, load_config
from dist_vae.data.stream import ShardStream
from dist_vae.engine.backend import EMA, make_optimizer
from dist_vae.engine.trainer import Trainer
from dist_vae.host_memory import return_large_blocks_to_os
from dist_vae.models import build_model
from tools.bench.steal import StealMeter


class BareLoop:
    """The plainest equivalent training loop, advanced one step per call."""

    def __init__(self, cfg: Config) -> None:
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, cfg.data.resolution, cfg.train.gradient_checkpointing)
        self.optimizer = make_optimizer(self.model, cfg)
        self.ema = EMA(self.model, cfg.train.ema_decay)
        self.grad_clip = cfg.train.grad_clip
        self.batches = iter(ShardStream(cfg.data, "train", 0, 1, cfg.seed, batch_size=cfg.data.batch_size))
        self.step = 0

    def __call__(self) -> None:
        out = self.model(next(self.batches), step=self.step)
        out.total().backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update()
        self.step += 1


class Pairing:
    """The trainer's `before_step` hook: the bare loop takes one step before each of the trainer's."""

    def __init__(self, bare: BareLoop) -> None:
        self.bare = bare
        self.bare_s: list[float] = []
        self.engine_s: list[float] = []
        self.bare_end: float | None = None

    def __call__(self, _step: int) -> None:
        start = time.perf_counter()
        if self.bare_end is not None:
            self.engine_s.append(start - self.bare_end)
        self.bare()
        self.bare_end = time.perf_counter()
        self.bare_s.append(self.bare_end - start)


def paired_round(cfg: Config, steps: int, burst: float, run_dir: Path) -> list[tuple[float, float]]:
    """(bare, engine) seconds of each pair of steps 1 .. steps-2 of one run, bursts left out."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg.run_dir = str(run_dir)
    cfg.train.steps = steps
    pairing = Pairing(BareLoop(cfg))
    Trainer(cfg, before_step=pairing).fit()
    pairs = list(zip(pairing.bare_s[1 : steps - 1], pairing.engine_s[1:], strict=True))
    limit = burst * statistics.median(t for pair in pairs for t in pair)
    return [pair for pair in pairs if max(pair) <= limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/debug.yaml"))
    parser.add_argument("--steps", type=int, default=60, help="at least 3")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--burst", type=float, default=1.5, help="see the module doc")
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
    with tempfile.TemporaryDirectory() as tmp:
        rounds = [paired_round(cfg, args.steps, args.burst, Path(tmp) / "run") for _ in range(args.rounds)]
    pairs = [pair for kept in rounds for pair in kept]
    bare, engine = (sum(side) / len(pairs) for side in zip(*pairs, strict=True))
    per_round = sorted(sum(e for _, e in kept) / sum(b for b, _ in kept) for kept in rounds)
    images = cfg.data.batch_size
    left_out = args.rounds * (args.steps - 2) - len(pairs)
    print(f"model {cfg.model.kind}, {cfg.data.resolution} px, batch {images}, {args.rounds} rounds x "
          f"{args.steps - 2} paired steps ({left_out} pairs with a burst left out)")  # fmt: skip
    print(f"{'loop':<8}{'ms/step':>10}{'img/s':>10}")
    print(f"{'bare':<8}{bare * 1e3:>10.1f}{images / bare:>10.1f}")
    print(f"{'engine':<8}{engine * 1e3:>10.1f}{images / engine:>10.1f}")
    ratio = engine / bare
    spread = f"rounds {per_round[0]:.3f} to {per_round[-1]:.3f}"
    overhead = f"overhead {100 * (ratio - 1):+.1f}%; {spread}"
    print(f"engine/bare time ratio {ratio:.3f} ({overhead})   (target < 1.05)")
    print(steal.line())


if __name__ == "__main__":
    main()
