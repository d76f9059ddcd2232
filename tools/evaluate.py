"""Evaluate a trained run over a whole split and write RUN_DIR/eval.json.

    python tools/evaluate.py RUN_DIR [--split val] [--iw-samples K] [--batch-size B] [--ema]

eval.json: elbo_bpd (bits/dim of -ELBO over every image of the split), iw_bpd (importance-weighted
with K samples; PixelVAE), kl (nats/image), mi (I(x; z) in nats; PixelVAE), active_units, and
fuzziness: the Laplacian variance of data and of samples (per step for the iterative VAE), plus the
PixelVAE decoder's spread (per-pixel std of draws that share one z).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tqdm import tqdm

from dist_vae.config import ConfigError
from dist_vae.data.stream import DataError, ShardStream
from dist_vae.inference import load_run
from dist_vae.metrics import evaluate, laplacian_variance, sample_spread
from dist_vae.models.pixel_vae import PixelVAE
from dist_vae.sampling import ancestral_samples, cached_decode, iterative_canvases


def fuzziness(
    model: torch.nn.Module, data: torch.Tensor, n: int, draws: int, generator: torch.Generator
) -> dict:
    """Sharpness of n samples next to n data images; for a PixelVAE also the spread given z."""
    result: dict = {"data_laplacian_var": laplacian_variance(data[:n]).mean().item()}
    if isinstance(model, PixelVAE):
        result["sample_laplacian_var"] = (
            laplacian_variance(ancestral_samples(model, n, generator)).mean().item()
        )
        z = torch.randn(2, model.latent_dim, generator=generator, device=generator.device).to(data.device)
        samples = torch.stack([cached_decode(model, z, generator) for _ in range(draws)], dim=1)
        result["decoder_spread"] = sample_spread(samples)
    else:
        canvases = iterative_canvases(model, n, generator)
        result["sample_laplacian_var_per_step"] = [laplacian_variance(c).mean().item() for c in canvases]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--split", default="val")
    parser.add_argument(
        "--iw-samples", type=int, default=16, help="K of the importance-weighted bound (0: skip)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's data.batch_size")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    parser.add_argument("--fuzz-samples", type=int, default=8, help="samples for the sharpness measures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.iw_samples < 0 or args.fuzz_samples < 2:
        parser.error(
            f"--iw-samples must be >= 0 and --fuzz-samples >= 2, got {args.iw_samples}, {args.fuzz_samples}"
        )
    try:
        run = load_run(args.run_dir, ema=args.ema, device=args.device)
        stream = ShardStream(run.cfg.data, args.split, batch_size=args.batch_size, training=False)
        torch.manual_seed(args.seed)  # the ELBO's own posterior sample
        generator = torch.Generator(args.device).manual_seed(args.seed)
        bar = tqdm(total=stream.total, unit="img", desc=f"evaluate {args.split}", disable=args.no_progress)
        with bar:
            result = evaluate(run.model, stream, args.iw_samples, generator, progress=bar.update)
        data = next(iter(ShardStream(run.cfg.data, args.split, batch_size=args.fuzz_samples, training=False)))
        result["fuzziness"] = fuzziness(run.model, data.to(args.device), args.fuzz_samples, 4, generator)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result.update(split=args.split, step=run.step, checkpoint=str(run.checkpoint), ema=run.ema)
    path = args.run_dir / "eval.json"
    tmp = path.with_name(".eval.json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
