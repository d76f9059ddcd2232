"""Naive vs cached PixelCNN++ generation at 32 px, side by side in one run (a script, not a test).

Both draw from the same generator seed; the script reports how many sub-pixels agree (float32 can
move a rare sample across a bin edge, since a window convolution sums in a different order).

    PYTHONPATH=. python tools/bench/sampling.py [--side 32] [--batch 4] [--nr-filters 64] [--nr-resnet 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from dist_vae.models.pixel_vae import PixelVAE, PixelVAEConfig


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--nr-filters", type=int, default=64)
    parser.add_argument("--nr-resnet", type=int, default=2)
    parser.add_argument("--nr-mix", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = PixelVAEConfig(
        latent_dim=32, nr_resnet=args.nr_resnet, nr_filters=args.nr_filters, nr_mix=args.nr_mix
    )
    model = PixelVAE(cfg, args.side).to(args.device)
    z = torch.randn(args.batch, 32, device=args.device)
    times, images = {}, {}
    for name in ("naive", "cached"):
        generator = torch.Generator(args.device).manual_seed(1)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        images[name] = model.generate(z, generator, cached=name == "cached")
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times[name] = time.perf_counter() - start
    same = (images["naive"] == images["cached"]).float().mean().item()
    print(
        f"{args.side} px, batch {args.batch}, nr_filters {args.nr_filters}, nr_resnet {args.nr_resnet}, "
        f"device {args.device}, threads {torch.get_num_threads()}"
    )
    print(f"{'method':<8} {'seconds':>9} {'img/s':>8}")
    for name, seconds in times.items():
        print(f"{name:<8} {seconds:9.2f} {args.batch / seconds:8.3f}")
    speedup = times["naive"] / times["cached"]
    print(f"speed-up cached/naive: {speedup:.1f}x; identical sub-pixels: {100 * same:.2f}%")


if __name__ == "__main__":
    main()
