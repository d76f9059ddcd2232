"""PNG grids from a trained run: prior samples, Markov chains (PixelVAE), per-step canvases (iterative).

    python tools/sample.py RUN_DIR [--ema] [--n N] [--chain-steps K] [--out DIR] [--seed S]

Reads RUN_DIR/config.yaml and the newest complete checkpoint. Writes into --out (default
RUN_DIR/samples/step-XXXXXXXX/): PixelVAE: ancestral.png (n images), chain_data.png and
chain_noise.png (one row per chain, x_0 .. x_K left to right; data chains start from val images,
noise chains from U(-1, 1)); iterative VAE: steps.png (one row per sample, canvases 1..T).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image

from dist_vae.config import ConfigError
from dist_vae.data.stream import DataError, ShardStream
from dist_vae.inference import load_run
from dist_vae.models.pixel_vae import PixelVAE
from dist_vae.sampling import ancestral_samples, iterative_canvases, markov_chain


def save_grid(rows: list[torch.Tensor], path: Path, pad: int = 2) -> None:
    """rows: each [cols, 3, H, W] in [-1, 1] -> one PNG, written under a temporary name then renamed."""
    cols = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[-2:]
    canvas = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        pixels = ((row.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for j, image in enumerate(pixels):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            canvas[top : top + h, left : left + w] = image
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(canvas).save(tmp, format="PNG")
    os.replace(tmp, path)


def _val_images(run, n: int) -> torch.Tensor:
    images = []
    for batch in ShardStream(run.cfg.data, "val", batch_size=n, training=False):
        images.append(batch)
        if sum(b.shape[0] for b in images) >= n:
            break
    return torch.cat(images)[:n]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--ema", action="store_true", help="sample with the EMA weights")
    parser.add_argument("--n", type=int, default=16, help="images (and chains) to draw")
    parser.add_argument("--chain-steps", type=int, default=8, help="Markov-chain steps K (PixelVAE)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.n < 1 or args.chain_steps < 0:
        parser.error(f"--n must be >= 1 and --chain-steps >= 0, got {args.n} and {args.chain_steps}")
    try:
        run = load_run(args.run_dir, ema=args.ema, device=args.device)
        out = args.out or args.run_dir / "samples" / f"step-{run.step:08d}"
        out.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator(args.device).manual_seed(args.seed)
        model = run.model
        written = []
        if isinstance(model, PixelVAE):
            save_grid([ancestral_samples(model, args.n, generator)], out / "ancestral.png")
            written.append(out / "ancestral.png")
            noise = torch.rand(
                args.n, 3, model.resolution, model.resolution, generator=generator, device=args.device
            )
            starts = {"data": _val_images(run, args.n).to(args.device), "noise": noise * 2 - 1}
            for name, start in starts.items():
                chain = markov_chain(model, start, args.chain_steps, generator)
                save_grid(list(torch.stack(chain, dim=1)), out / f"chain_{name}.png")
                written.append(out / f"chain_{name}.png")
        else:
            canvases = iterative_canvases(model, args.n, generator)
            save_grid(list(torch.stack(canvases, dim=1)), out / "steps.png")
            written.append(out / "steps.png")
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
