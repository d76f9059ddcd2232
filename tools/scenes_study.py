"""The seed's claims on procedural scenes, rebuilt from nothing by one resumable command.

    python tools/scenes_study.py [--out runs/scenes_study] [--quick] [--only claim1|claim2|claim3]

Stages (each skips what is finished: a trained run's `done`, a written result JSON):
  shards   --source scenes:N at 32 px (16 px with --quick) and their factor probe
  claim 1  latent use: PixelVAE (configs/demo_pixelvae.yaml) with reg = elbo, none, mmd, stein,
           adversarial, and elbo and mmd again with a larger decoder (3 gated resnets per stage, 3
           stages). Per run, on the EMA weights: KL and I(x; z) over up to 4,096 train images
           (tools/evaluate.py; the estimate is capped by log N = 8.3 nats, not by a small val split),
           active units, and a linear read-out of every factor from the posterior means
           (dist_vae/metrics/latent_probe.py; accuracy or R² on val). Writes OUT/claim1.json and
           OUT/claim1.md (the table for docs/results.md).
  claim 2  Markov chains from data and from noise, K = 0..8, on claim 1's large elbo and mmd runs: FID and
           the probe's on-manifold scores per step, against ancestral samples (scenes_study_chains.py).
  claim 3  iterative VAE T = 8 vs T = 1 vs a one-step VAE with one code, same total code size: FID,
           edge sharpness and decoder spread per step (scenes_study_injection.py).

--quick (16 px, 60 steps) proves the stages work, not the claims.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from dist_vae.data.scenes import read_labelled
from dist_vae.data.shards import ShardSettings, build_shards
from dist_vae.files import write_bytes_atomic, write_text_atomic
from dist_vae.metrics.latent_probe import linear_factor_scores, posterior_means
from dist_vae.metrics.probe import PROBE_DIR, TrainSettings, to_input, train_probe
from dist_vae.run_dir import load_run
from dist_vae.run_layout import RunDir
from tools import scenes_study_chains, scenes_study_injection
from tools.scenes_study_runs import ROOT, tool, train_run

REGS = ("elbo", "none", "mmd", "stein", "adversarial")
# The demo decoder (one gated resnet per stage, 2 stages) sees too little context to draw a room by
# itself, so z pays for itself even under the ELBO; the larger one (2.8x the step cost) is the test.
DECODERS = {"small": (), "large": ("model.nr_resnet=3", "model.n_stages=3")}
LARGE_REGS = ("elbo", "mmd")
FULL = {"scenes": 12000, "side": 32, "steps": 1500, "read_out": 4000}
QUICK = {"scenes": 600, "side": 16, "steps": 60, "read_out": 300}
FULL |= {"chains": 48, "inject_steps": 400, "inject_n": 100}
QUICK |= {"chains": 16, "inject_steps": 40, "inject_n": 16}


def make_data(out: Path, size: dict[str, int]) -> Path:
    shards = out / "shards"
    if not (shards / "manifest.json").is_file():
        build_shards(ShardSettings(f"scenes:{size['scenes']}", size["side"], val_fraction=0.1), shards)
    if not (shards / PROBE_DIR / "probe.json").is_file():
        train_probe(shards, TrainSettings(epochs=6, limit=1200 if size is FULL else None))
    return shards


def run_name(reg: str, decoder: str) -> str:
    return f"pixelvae_{reg}" if decoder == "small" else f"pixelvae_{decoder}_{reg}"


def claim1_run(out: Path, shards: Path, size: dict[str, int], reg: str, decoder: str) -> dict:
    """Train (or resume) one PixelVAE, then its numbers; cached in RUN/claim1.json."""
    run_dir = out / run_name(reg, decoder)
    result_file = run_dir / "claim1.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    steps = size["steps"]
    train_run(
        run_dir, "configs/demo_pixelvae.yaml", shards, size["side"], steps,
        f"model.reg={reg}", f"train.warmup={min(100, steps // 4)}", "train.sample_count=4",
        *DECODERS[decoder],
    )  # fmt: skip
    pictures = out / "pictures"
    pictures.mkdir(exist_ok=True)
    grid = RunDir(run_dir).sample_grid(steps).read_bytes()
    write_bytes_atomic(pictures / f"claim1_{run_dir.name.removeprefix('pixelvae_')}.png", grid)
    evaluation = run_dir / "eval-train-iw0.json"
    tool(
        "tools/evaluate.py", str(run_dir), "--ema", "--split", "train", "--iw-samples", "0",
        "--fuzz-samples", "2", "--chain-steps", "0", "--no-progress", "--out", str(evaluation),
        log=run_dir / "evaluate.log",
    )  # fmt: skip
    numbers = json.loads(evaluation.read_text())
    model = load_run(run_dir, ema=True).model
    train_images, train_factors = read_labelled(shards, "train", size["read_out"])
    val_images, val_factors = read_labelled(shards, "val")
    z_train, z_val = (
        posterior_means(model, to_input(train_images)),
        posterior_means(model, to_input(val_images)),
    )
    result = {
        "reg": reg,
        "decoder": decoder,
        "step": numbers["step"],
        "kl": numbers["kl"],
        "mi": numbers["mi"],
        "mi_images": numbers["mi_images"],
        "active_units": numbers["active_units"],
        "latent_dim": numbers["latent_dim"],
        "elbo_bpd": numbers["elbo_bpd"],
        "read_out": linear_factor_scores(z_train, train_factors, z_val, val_factors),
    }
    write_text_atomic(result_file, json.dumps(result, indent=2) + "\n")
    return result


def claim1_table(rows: list[dict]) -> str:
    factors = list(rows[0]["read_out"])
    head = ["reg", "decoder", "-ELBO bpd", "KL (nats)", "I(x; z) (nats, N)", "active / dims", *factors]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["reg"], r["decoder"], f"{r['elbo_bpd']:.3f}", f"{r['kl']:.2f}",
            f"{r['mi']:.2f} ({r['mi_images']})",
            f"{r['active_units']} / {r['latent_dim']}", *(f"{r['read_out'][f]:.2f}" for f in factors),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "scenes_study")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves the stages, not the claims")
    parser.add_argument(
        "--only", choices=("claim1", "claim2", "claim3"), help="one claim (claim 2 reads claim 1's runs)"
    )
    parser.add_argument("--lanes", type=int, default=2, help="runs trained at once (one thread each)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    size = QUICK if args.quick else FULL
    out = args.out.resolve()
    shards = make_data(out, size)
    if args.only in (None, "claim1"):
        with ThreadPoolExecutor(args.lanes) as pool:
            runs = [(reg, "large") for reg in LARGE_REGS] + [(reg, "small") for reg in REGS]
            rows = list(pool.map(lambda run: claim1_run(out, shards, size, *run), runs))
        write_text_atomic(out / "claim1.json", json.dumps(rows, indent=2) + "\n")
        table = claim1_table(rows)
        write_text_atomic(out / "claim1.md", table)
        print(table, end="")
    if args.only in (None, "claim2"):
        runs = [run_name(reg, "large") for reg in LARGE_REGS]
        table = scenes_study_chains.run(out, shards, size, args.quick, runs)
        write_text_atomic(out / "claim2.md", table)
        print(table, end="")
    if args.only in (None, "claim3"):
        print(scenes_study_injection.run(out, shards, size, args.quick), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
