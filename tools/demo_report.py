"""The demo's report on a run trained on scene shards: a grid of samples under val scenes, FID, and the
factor probe's scores, printed in a few lines and written to RUN_DIR/demo_report.json.

    python tools/demo_report.py RUN_DIR [--fid N] [--probe-n N] [--grid PNG]   # `make demo` ends with it

The run's data.path must hold scenes (`--source scenes:N`) and their cached probe. Samples are
ancestral (z ~ p(z), the last generation step), from the EMA weights when the run kept them.
FID: N samples against the first N val images (dist_vae/metrics/sample_quality.py; needs the
`[metrics]` extra). The probe (dist_vae/metrics/probe.py) compares --probe-n samples with as many val
images: a Fréchet distance in its features (not FID), with train against val images beside it as
the floor, and the on-manifold scores (confidence, render error) of samples and of val images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from dist_vae.data.scenes import read_labelled
from dist_vae.errors import DistVaeError, ExitCode
from dist_vae.files import image_grid, save_png_atomic, write_text_atomic
from dist_vae.metrics.inception import require_libraries
from dist_vae.metrics.probe import load_probe, probe_frechet_distance, probe_report, to_input
from dist_vae.metrics.settings import EvalConfig
from dist_vae.run_dir import LoadedRun, load_run
from dist_vae.run_layout import RunDir
from dist_vae.sampling import prior_samples


def write_grid(real: torch.Tensor, fake: torch.Tensor, cols: int, rows: int, scale: int, path: Path) -> None:
    """One row of val scenes, then `rows` rows of `cols` samples, enlarged `scale` times (nearest)."""
    rows_of_images = [real[:cols], *fake[: rows * cols].split(cols)]
    grid = image_grid(rows_of_images)
    save_png_atomic(grid.repeat(scale, axis=0).repeat(scale, axis=1), path)


def fid(run: LoadedRun, n: int, seed: int) -> dict[str, float]:
    """FID, KID, precision and recall of n ancestral samples against the first n val images."""
    require_libraries()
    from dist_vae.metrics.sample_quality import quality_by_way

    cfg = EvalConfig(fid_samples=n, batch_size=50)
    return quality_by_way(run.model, run.cfg.data, "val", cfg, seed)["prior"]


def report(run: LoadedRun, args: argparse.Namespace) -> dict:
    """The grid, the probe's numbers and FID, as one JSON-ready dict."""
    data = Path(run.cfg.data.path)
    probe, _ = load_probe(data)
    real = to_input(read_labelled(data, "val", args.probe_n)[0])
    train = to_input(read_labelled(data, "train", len(real))[0])
    generator = torch.Generator().manual_seed(args.seed)
    fake = prior_samples(run.model, len(real), generator)[-1].float().clamp(-1, 1)
    grid = args.grid or RunDir(args.run_dir).samples / "demo_grid.png"
    write_grid(real, fake, args.cols, args.rows, args.scale, grid)
    result = {"step": run.step, "ema": run.ema, "grid": str(grid), "probe_n": len(real)}
    result["probe"] = probe_report(probe, real, fake)
    result["probe"]["probe_fd_train_vs_val"] = probe_frechet_distance(probe, real, train)
    if args.fid:
        result["fid_n"] = args.fid
        result["fid"] = fid(run, args.fid, args.seed)
    return result


def print_report(result: dict) -> None:
    p, n = result["probe"], result["probe_n"]
    print(
        f"grid: {result['grid']} (top row: val scenes; below: samples of step {result['step']}"
        f"{', EMA weights' if result['ema'] else ''})"
    )
    if "fid" in result:
        f, k = result["fid"], result["fid_n"]
        print(
            f"FID (Inception, N={k} samples vs the first {k} val images): {f['fid']:.1f}; "
            f"KID {f['kid']:.3f}, precision {f['precision']:.2f}, recall {f['recall']:.2f}"
        )
    print(
        f"probe Fréchet distance (factor-probe features, not FID; N={n} vs {n} val images): "
        f"{p['probe_fd']:.2f} (train vs val images: {p['probe_fd_train_vs_val']:.2f})"
    )
    print(
        f"on the manifold, samples (val images): probe confidence {p['fake_confidence']:.3f} "
        f"({p['real_confidence']:.3f}), render error {p['fake_render_error']:.3f} "
        f"({p['real_render_error']:.3f}) RMS in [0, 1]"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--fid", type=int, default=100, help="N for FID (0: skip; >= 3 otherwise)")
    parser.add_argument("--probe-n", type=int, default=300, help="val images (and samples) the probe judges")
    parser.add_argument("--cols", type=int, default=8, help="images per grid row")
    parser.add_argument("--rows", type=int, default=4, help="rows of samples in the grid")
    parser.add_argument("--scale", type=int, default=3, help="the grid's enlargement (nearest pixel)")
    parser.add_argument("--grid", type=Path, default=None, help="default: RUN_DIR/samples/demo_grid.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (
        (args.fid and args.fid < 3)
        or args.probe_n < args.rows * args.cols
        or min(args.rows, args.cols, args.scale) < 1
    ):
        parser.error("--fid must be 0 or >= 3, --probe-n >= --rows x --cols, each >= 1, and --scale >= 1")
    try:
        result = report(load_run(args.run_dir), args)
    except DistVaeError as exc:
        print(f"demo_report.py: error: {exc}", file=sys.stderr)
        return ExitCode.REFUSED
    write_text_atomic(args.run_dir / "demo_report.json", json.dumps(result, indent=2) + "\n")
    print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
