"""FID's cost: Inception img/s here, and evaluation time / training time at the debug config's cadence.

    PYTHONPATH=. python tools/bench/fid.py [--config C.yaml] [--every 200] [--n 48] [--steps 40] [k=v ...]

One run, one process: (1) the standard Inception network on 16 demo images (32 px, resized to 299),
img/s with and without the clean-fid resize; (2) the debug config trained by the real Trainer for
`--steps` steps, its step time (its own perf/img_per_s, start-up left out) scaled to `--every`
steps (eval.fid_every when turned on, the debug train.eval_every); then the reference features of
N val images (built once, cached) and one in-training evaluation (`fid_during_training`: N prior
samples against them) on the trained model.
The ratio is the evaluation's time over the training time of `--every` steps. Also printed: the
sampler's time per image over the training time per image (the PixelVAE's factor in the README).
On a shared machine run the two sides close together: they are, in one process, one after the other.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars between the lines
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_vae.config import load_config
from dist_vae.data.stream import ShardStream
from dist_vae.engine.trainer import Trainer
from dist_vae.files import to_uint8
from dist_vae.metrics.during_training import fid_during_training
from dist_vae.metrics.inception import clean_resize, load_inception
from dist_vae.metrics.reference import cache_path, reference_features
from dist_vae.run_layout import RunDir
from dist_vae.sampling import prior_samples


def timed(call: object) -> tuple[float, object]:
    started = time.perf_counter()
    result = call()  # type: ignore[operator]
    return time.perf_counter() - started, result


def step_seconds(tensorboard: Path, batch: int) -> float:
    """Seconds per step from the trainer's own perf/img_per_s (pauses for evaluation and checkpoints
    excluded), over every log window but the first (start-up, the first batch)."""
    events = EventAccumulator(str(tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    rates = [event.value for event in events.Scalars("perf/img_per_s")][1:]
    return batch / statistics.mean(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/debug.yaml")
    parser.add_argument("--every", type=int, default=200, help="eval.fid_every (the debug train.eval_every)")
    parser.add_argument("--n", type=int, default=48, help="eval.fid_samples (the demo val split has 57)")
    parser.add_argument("--steps", type=int, default=40, help="training steps timed (scaled to --every)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.path=DIR")
    args = parser.parse_args()
    base = load_config(args.config, args.overrides)
    if not Path(base.data.path, "manifest.json").is_file():
        sys.exit(f"no shards at {base.data.path}: run `make demo` (or tools/make_shards.py) first")
    print(f"torch threads: {torch.get_num_threads()}, CPU cores: {os.cpu_count()}")

    extractor = load_inception()
    val = next(iter(ShardStream(base.data, "val", batch_size=16, training=False)))
    images = to_uint8(val)
    extractor(images[:2])  # warm-up
    embed_s, _ = timed(lambda: extractor(images))
    resize_s, _ = timed(lambda: [clean_resize(image) for image in images.numpy()])
    print(f"Inception (clean resize + network): {len(images) / embed_s:.2f} img/s; resize alone "
          f"{len(images) / resize_s:.1f} img/s ({resize_s / embed_s:.1%} of the time)")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*args.overrides, f"run_dir={tmp}/run", f"train.steps={args.steps}", "resume=never"]
        trainer = Trainer(load_config(args.config, overrides))
        trainer.fit()
        train_s = args.steps * step_seconds(
            RunDir(Path(tmp) / "run").tensorboard, trainer.cfg.data.batch_size
        )
        model = trainer.ema.model if trainer.ema is not None else trainer.raw_model
        fid_on = [f"eval.fid_every={args.every}", f"eval.fid_samples={args.n}"]
        cfg = load_config(args.config, [*overrides, *fid_on])
        e = cfg.eval
        cache_path(cfg.data.path, e.fid_split, cfg.data.resolution, args.n, extractor.sha256).unlink(
            missing_ok=True
        )
        reference_s, _ = timed(
            lambda: reference_features(cfg.data, e.fid_split, args.n, extractor, e.batch_size)
        )
        eval_s, quality = timed(
            lambda: fid_during_training(
                model,
                cfg.eval,
                cfg.data,
                args.every,
                torch.device("cpu"),
                seed=cfg.seed,
                precision=cfg.train.precision,
            )
        )
        sample_s, _ = timed(lambda: prior_samples(model, 8))
    cadence_s = train_s / args.steps * args.every
    per_train_image = train_s / (args.steps * cfg.data.batch_size)
    print(f"training (the trainer's perf/img_per_s): {args.steps} steps in {train_s:.1f} s "
          f"({per_train_image * 1e3:.1f} ms/image), so {args.every} steps ~ {cadence_s:.0f} s")  # fmt: skip
    print(f"one evaluation, N={args.n}: {eval_s:.1f} s, reference cached (built once in {reference_s:.1f} s)")
    print(f"  {quality}")
    print(f"evaluation / training time at eval.fid_every={args.every}: {eval_s / cadence_s:.2f}")
    print(f"sampling / training time per image: {sample_s / 8 / per_train_image:.0f}x ({sample_s / 8:.2f} s)")


if __name__ == "__main__":
    main()
