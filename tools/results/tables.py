"""Markdown tables for docs/results.md from finished run directories (TensorBoard logs + eval/*.json).

    python tools/results/tables.py runs/results

Prints, for every PixelVAE run under the directory, the training KL and bits/dim at a few steps
and its evaluation numbers; for every iterative run, the sharpness of its samples step by step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

CURVE_STEPS = (100, 250, 500, 1000, 1500, 2000)


def scalar_at(events: EventAccumulator, tag: str, step: int, window: int = 4) -> float | None:
    """The mean of the `window` logged values of `tag` up to `step` (training scalars are noisy)."""
    if tag not in events.Tags()["scalars"]:
        return None
    values = [e.value for e in events.Scalars(tag) if e.step <= step][-window:]
    return sum(values) / len(values) if values else None


def fmt(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def read_eval(path: Path) -> dict:
    if not path.is_file():
        raise SystemExit(f"{path} is missing: make it with tools/evaluate.py (see docs/results.md)")
    return json.loads(path.read_text())


def load(run: Path) -> tuple[str, EventAccumulator, dict]:
    """The run's kind, TensorBoard scalars and the evaluations evaluate_demo_runs.sh made:
    eval/ema-val-iw16.json and, when present, eval/ema-train-iw0.json (the train split: more images,
    so the MI estimate's log N ceiling is higher)."""
    config = (run / "config.yaml").read_text()
    kind = "pixel_vae" if "kind: pixel_vae" in config else "iterative_vae"
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    evals = {"val": read_eval(run / "eval" / "ema-val-iw16.json")}
    if (run / "eval" / "ema-train-iw0.json").is_file():
        evals["train"] = read_eval(run / "eval" / "ema-train-iw0.json")
    return kind, events, evals


def mi_cell(ev: dict) -> str:
    return (
        f"{fmt(ev['mi'])} (log {ev['mi_images']} = {math.log(ev['mi_images']):.2f})"
        if ev["mi_images"]
        else "-"
    )


def pixel_tables(runs: list[tuple[str, EventAccumulator, dict]]) -> None:
    print("KL(q(z|x) || p(z)) in nats per image during training (mean of the last 4 logged values):\n")
    print("| run | " + " | ".join(f"step {s}" for s in CURVE_STEPS) + " |")
    print("|---" * (len(CURVE_STEPS) + 1) + "|")
    for name, events, _ in runs:
        row = [fmt(scalar_at(events, "train/kl", s), 1) for s in CURVE_STEPS]
        print(f"| {name} | " + " | ".join(row) + " |")
    print("\nEvaluation (tools/evaluate.py) of the final EMA weights; MI is at most log N:\n")
    print("| run | val bpd (-ELBO) | val IW bpd | val KL (nats) | MI val | MI train | active units |")
    print("|---|---|---|---|---|---|---|")
    for name, _, evs in runs:
        ev, train = evs["val"], evs.get("train")
        print(
            f"| {name} | {fmt(ev['elbo_bpd'], 3)} | {fmt(ev['iw_bpd'], 3)} | {fmt(ev['kl'], 1)} | "
            f"{mi_cell(ev)} | {mi_cell(train) if train else '-'} | "
            f"{ev['active_units']} / {ev['latent_dim']} |"
        )
    print("\nSharpness (Laplacian variance; data = val images) and the decoder's spread for a fixed z:\n")
    print(
        "| run | data | ancestral samples | decoder spread | data chain x_0 .. x_K | noise chain x_0 .. x_K |"
    )
    print("|---|---|---|---|---|---|")
    for name, _, evs in runs:
        fz = evs["val"]["fuzziness"]
        chains, samples = fz["chain_laplacian_var_per_step"], fz["sample_laplacian_var_per_step"][-1]
        print(
            f"| {name} | {fmt(fz['data_laplacian_var'], 3)} | {fmt(samples, 3)} | "
            f"{fmt(fz['decoder_spread'], 3)} | {' '.join(fmt(v, 3) for v in chains['data'])} | "
            f"{' '.join(fmt(v, 3) for v in chains['noise'])} |"
        )


def iterative_tables(runs: list[tuple[str, EventAccumulator, dict]]) -> None:
    print("Sharpness (Laplacian variance) of prior samples after each step t, next to the data's:\n")
    steps = max(len(evs["val"]["fuzziness"]["sample_laplacian_var_per_step"]) for _, _, evs in runs)
    print("| run | data | " + " | ".join(f"t={t}" for t in range(1, steps + 1)) + " | val bpd | KL (nats) |")
    print("|---" * (steps + 4) + "|")
    for name, _, evs in runs:
        ev = evs["val"]
        per_step = ev["fuzziness"]["sample_laplacian_var_per_step"]
        cells = [fmt(v, 4) for v in per_step] + [""] * (steps - len(per_step))
        print(
            f"| {name} | {fmt(ev['fuzziness']['data_laplacian_var'], 4)} | "
            + " | ".join(cells)
            + f" | {fmt(ev['elbo_bpd'], 3)} | {fmt(ev['kl'], 1)} |"
        )
    print("\nReconstructions of val images from the posterior means after each step t: sharpness, then")
    print("squared error per dimension (images in [-1, 1]):\n")
    print("| run | measure | " + " | ".join(f"t={t}" for t in range(1, steps + 1)) + " |")
    print("|---" * (steps + 2) + "|")
    for name, _, evs in runs:
        fz = evs["val"]["fuzziness"]
        for label, key, digits in (
            ("Laplacian var", "reconstruction_laplacian_var", 4),
            ("MSE", "reconstruction_mse", 4),
        ):
            cells = [fmt(v, digits) for v in fz[f"{key}_per_step"]]
            cells += [""] * (steps - len(cells))
            print(f"| {name} | {label} | " + " | ".join(cells) + " |")
    print("\nTraining reconstruction error per step (mean squared error per dimension, last 4 logs):\n")
    print("| run | " + " | ".join(f"t={t}" for t in range(1, steps + 1)) + " |")
    print("|---" * (steps + 1) + "|")
    for name, events, _ in runs:
        last = max(e.step for e in events.Scalars("train/rec"))
        cells = [fmt(scalar_at(events, f"train/rec/step{t}", last), 4) for t in range(1, steps + 1)]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", type=Path, help="directory holding the run directories")
    args = parser.parse_args(argv)
    found = sorted(p for p in args.runs.iterdir() if (p / "config.yaml").is_file())
    if not found:
        print(f"error: no run directories (with config.yaml) under {args.runs}", file=sys.stderr)
        return 2
    loaded = [(p.name, *load(p)) for p in found]
    pixel = [(n, e, ev) for n, k, e, ev in loaded if k == "pixel_vae"]
    iterative = [(n, e, ev) for n, k, e, ev in loaded if k == "iterative_vae"]
    if pixel:
        pixel_tables(pixel)
    if iterative:
        print()
        iterative_tables(iterative)
    return 0


if __name__ == "__main__":
    sys.exit(main())
