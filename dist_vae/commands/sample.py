"""PNG grids from a trained run: prior samples and Markov chains, for any registered model.

    python tools/sample.py RUN_DIR [--[no-]ema] [--n N] [--chain-steps K] [--out DIR] [--seed S]
    accelerate launch [--config_file configs/accelerate/ddp.yaml] tools/sample.py RUN_DIR ...

Reads RUN_DIR/config.yaml and the newest complete checkpoint (its EMA weights when it has them).
Writes into --out (default RUN_DIR/samples/step-XXXXXXXX/): ancestral.png (n prior samples in one
row; for a model that generates in several steps, such as the iterative VAE, one row per sample with
its steps left to right), chain_data.png and chain_noise.png (one row per chain, x_0 .. x_K left to
right; data chains start from val images, or from train images when the val split is empty (one line
says so), noise chains from U(-1, 1)).
Under several processes each draws its share of the n images and chains (seeded per process) and
the main process writes the grids.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from accelerate.utils import gather_object

from dist_vae.data.stream import ShardStream
from dist_vae.distributed import share, tool_device, tool_state
from dist_vae.errors import DataError, DistVaeError, ExitCode
from dist_vae.files import image_grid, save_png_atomic
from dist_vae.run_dir import LoadedRun, load_run
from dist_vae.run_layout import RunDir
from dist_vae.sampling import markov_chain, prior_samples


def chain_starts(run: LoadedRun, n: int) -> tuple[torch.Tensor, str]:
    """The first n images of the val split (fewer if it is smaller) and "val"; the train split's and
    "train" when val is empty, as make_shards' default --val-fraction leaves a small source."""
    for split in ("val", "train"):
        images: list[torch.Tensor] = []
        for batch in ShardStream(run.cfg.data, split, batch_size=n, training=False):
            images.append(batch)
            if sum(b.shape[0] for b in images) >= n:
                break
        if images:
            return torch.cat(images)[:n], split
    raise DataError(f"{run.cfg.data.path} holds no images in its val or train split")


def draw(
    run: LoadedRun, rows: range, n: int, chain_steps: int, seed: int, rank: int
) -> dict[str, torch.Tensor]:
    """This process's rows of every grid, each [rows, cols, 3, R, R] on the CPU; rank 0 says in one
    line when the data chains start from train images."""
    model, device = run.model, next(run.model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed + rank)
    side = model.resolution
    # Every process builds the same n starts (one seed) and keeps its rows.
    noise = torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    data, split = chain_starts(run, n)
    if split != "val" and rank == 0:
        print(
            f"{run.cfg.data.path}: the val split is empty; data chains start from {split} images",
            file=sys.stderr,
        )
    starts = {"chain_data": data, "chain_noise": noise}
    grids = {"ancestral": torch.stack(prior_samples(model, len(rows), generator), dim=1).cpu()}
    for name, start in starts.items():
        mine = start[rows.start : rows.stop].to(device)  # empty past a split smaller than n
        chain = markov_chain(model, mine, chain_steps, generator) if len(mine) else [mine] * (chain_steps + 1)
        grids[name] = torch.stack(chain, dim=1).cpu()
    return grids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sample with the EMA weights (--no-ema: the trained ones; default: EMA when the run has them)",
    )
    parser.add_argument("--n", type=int, default=16, help="images (and chains) to draw")
    parser.add_argument("--chain-steps", type=int, default=8, help="Markov-chain steps K")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: this process's GPU, else the CPU")
    args = parser.parse_args(argv)
    if args.n < 1 or args.chain_steps < 0:
        parser.error(f"--n must be >= 1 and --chain-steps >= 0, got {args.n} and {args.chain_steps}")
    state = tool_state()
    if args.n < state.num_processes:
        parser.error(f"--n {args.n} is smaller than the {state.num_processes} processes")
    try:
        device = tool_device(args.device, state)
        run = load_run(args.run_dir, ema=args.ema, device=device)
        rows = share(args.n, state.process_index, state.num_processes)
        mine = draw(run, rows, args.n, args.chain_steps, args.seed, state.process_index)
    except DistVaeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.REFUSED
    shares = gather_object([mine])
    if state.is_main_process:
        out = args.out or RunDir(args.run_dir).sample_set(run.step)
        for name in mine:
            grid = torch.cat([s[name] for s in shares])
            rows_of_images = [grid[:, 0]] if grid.shape[1] == 1 else list(grid)
            save_png_atomic(image_grid(rows_of_images), out / f"{name}.png")
            print(out / f"{name}.png")
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
