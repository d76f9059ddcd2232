"""Engine overhead: the trainer's step rate vs a bare PyTorch loop, same model, data and optimizer.

    PYTHONPATH=. python tools/bench/engine.py --config configs/debug.yaml --steps 60

Both loops take batches from the same ShardStream and run forward, backward, clipping and AdamW;
the engine adds accumulation bookkeeping, skip decisions, EMA, logging and the preemption check.
Evaluation, sampling and periodic checkpoints are pushed past the end; the one final checkpoint
the engine always writes is timed separately and left out. Runs alternate (bare, engine, bare,
engine) and the best of each is reported, which tames a noisy shared machine.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from dist_vae.config import Config, load_config
from dist_vae.data.stream import ShardStream
from dist_vae.engine.trainer import Trainer, make_optimizer, per_rank_batch
from dist_vae.models import build_model


def bare_loop(cfg: Config, steps: int) -> float:
    """Seconds per step of the plainest equivalent loop."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.data.resolution, cfg.train.gradient_checkpointing)
    optimizer = make_optimizer(model, cfg)
    batches = iter(ShardStream(cfg.data, "train", 0, 1, cfg.seed, batch_size=per_rank_batch(cfg)))
    started = time.perf_counter()
    for step in range(steps):
        out = model(next(batches), step=step)
        out.total().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - started) / steps


def engine_loop(cfg: Config, steps: int, run_dir: Path) -> float:
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg.run_dir = str(run_dir)
    cfg.train.steps = steps
    trainer = Trainer(cfg)
    started = time.perf_counter()
    trainer.fit()
    elapsed = time.perf_counter() - started
    started = time.perf_counter()
    trainer.save()  # the same final save again, to subtract its cost
    return (elapsed - (time.perf_counter() - started)) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/debug.yaml"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    never = str(10**9)
    cfg = load_config(
        args.config,
        [*args.overrides, "resume=never", f"train.checkpoint_every={never}", f"train.eval_every={never}",
         f"train.sample_every={never}", "train.ema_decay=0.999"],
    )  # fmt: skip
    bare, engine = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            bare.append(bare_loop(cfg, args.steps))
            engine.append(engine_loop(cfg, args.steps, Path(tmp) / "run"))
    b, e = min(bare), min(engine)
    images = per_rank_batch(cfg)
    shape = f"{cfg.model.kind}, {cfg.data.resolution} px, batch {images}"
    print(f"model {shape}, {args.steps} steps x {args.rounds} rounds")
    print(f"{'loop':<8}{'ms/step':>10}{'img/s':>10}")
    print(f"{'bare':<8}{b * 1e3:>10.1f}{images / b:>10.1f}")
    print(f"{'engine':<8}{e * 1e3:>10.1f}{images / e:>10.1f}")
    print(f"engine/bare time ratio {e / b:.3f} (overhead {100 * (e / b - 1):+.1f}%)")


if __name__ == "__main__":
    main()
