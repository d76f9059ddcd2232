"""Evaluate a trained run over a whole split and write RUN_DIR/eval/NAME.json and RUN_DIR/eval.json.

    python tools/evaluate.py RUN_DIR [--split val] [--iw-samples K] [--batch-size B] [--[no-]ema] [--out FILE]
    accelerate launch [--config_file configs/accelerate/ddp.yaml] tools/evaluate.py RUN_DIR ...

NAME says the options, so that no evaluation replaces one made with others: the weights (`ema` or
`noema`), the split, `iwK`, then `fidN` (`fidN-perstep`) and `seedS` when given; for example
`eval/ema-val-iw16.json`. RUN_DIR/eval.json is a copy of the latest evaluation; `--out FILE` writes
FILE alone. One line on stderr names the files written.

The result: elbo_bpd (bits/dim of -ELBO over every image of the split), iw_bpd (importance-weighted
with K samples), kl (nats/image), mi (I(x; z) in nats over mi_images images: at most log mi_images),
active_units of latent_dim, and fuzziness: the Laplacian variance of data, of prior samples and of
reconstructions (per generation step), the reconstructions' squared error, the decoder's spread
(per-pixel std of draws that share one z) and the sharpness along Markov chains.
Under several processes each evaluates its share of the split (nothing dropped, nothing twice), the
main process merges the shares and writes eval.json; the numbers equal a one-process run's up to the
random draws, which are seeded per process. A posterior that is not one Gaussian per image (the
iterative VAE's) has its MI sampled over the first process's share.

`--fid N` adds sample_quality: FID, KID (mean, std), precision, recall, density and coverage of N
generated images against the first N images of the split, for each way the model samples: `prior`,
with `--per-step` every generation step (`prior_step_k`), and the Markov chain after --chain-steps
steps from the split's images and from noise (dist_vae/metrics/sample_quality.py). It needs the
`[metrics]` extra; the split's reference features are cached beside its manifest.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from accelerate.utils import gather_object
from tqdm import tqdm

from dist_vae.data.config import DataConfig
from dist_vae.data.stream import ShardStream
from dist_vae.distributed import tool_device, tool_state
from dist_vae.errors import DataError, DistVaeError, ExitCode
from dist_vae.files import write_text_atomic
from dist_vae.metrics import accumulate, laplacian_variance, sample_spread_per_step, summarize
from dist_vae.metrics.inception import require_libraries
from dist_vae.metrics.settings import EvalConfig
from dist_vae.models.protocol import GenerativeModel, evaluating
from dist_vae.run_dir import load_run
from dist_vae.run_layout import RunDir
from dist_vae.sampling import markov_chain, prior_samples, reconstructions


def sharpness(images: torch.Tensor) -> float:
    return laplacian_variance(images).mean().item()


def fuzziness(
    model: GenerativeModel,
    data: torch.Tensor,
    n: int,
    draws: int,
    chain_steps: int,
    generator: torch.Generator,
) -> dict:
    """Sharpness of n data images, of n prior samples and of the reconstructions of the data, per
    generation step; the decoder's spread given z; the sharpness along Markov chains from data and
    from noise (x_0 .. x_K) with the mean absolute change from x_0 of the data chains: a chain that
    stays on the data keeps the data's sharpness, one from noise should reach it."""
    data = data[:n]
    result: dict = {"data_laplacian_var": sharpness(data)}
    result["sample_laplacian_var_per_step"] = [sharpness(s) for s in prior_samples(model, n, generator)]
    recons = reconstructions(model, data, generator)
    result["reconstruction_laplacian_var_per_step"] = [sharpness(r) for r in recons]
    result["reconstruction_mse_per_step"] = [(r.to(data) - data).square().mean().item() for r in recons]
    with evaluating(model):
        z = model.prior_sample(2, generator)
    result["decoder_spread"] = sample_spread_per_step(model, z, draws, generator)[-1]
    noise = torch.rand(data.shape, generator=generator, device=generator.device).to(data) * 2 - 1
    chains = {name: markov_chain(model, start, chain_steps, generator) for name, start in
              (("data", data), ("noise", noise))}  # fmt: skip
    result["chain_laplacian_var_per_step"] = {k: [sharpness(x) for x in c] for k, c in chains.items()}
    result["data_chain_change_per_step"] = [(x - data).abs().mean().item() for x in chains["data"]]
    return result


def sample_quality(
    model: GenerativeModel, data_cfg: DataConfig, args: argparse.Namespace, quiet: bool
) -> dict:
    """{way: numbers} (main process; {} elsewhere); the [metrics] libraries load only when asked for."""
    require_libraries()
    from dist_vae.metrics.sample_quality import quality_by_way

    cfg = EvalConfig(fid_samples=args.fid, batch_size=args.fid_batch, inception=args.inception)
    with tqdm(unit="img", desc=f"FID N={args.fid}", disable=quiet) as bar:
        return quality_by_way(
            model, data_cfg, args.split, cfg, args.seed,
            per_step=args.per_step, chain_steps=args.chain_steps, progress=bar.update,
        )  # fmt: skip


def result_name(ema: bool, args: argparse.Namespace) -> str:
    """The file name of one evaluation: its options, so that evaluations with other options are kept."""
    parts = ["ema" if ema else "noema", args.split, f"iw{args.iw_samples}"]
    if args.fid:
        parts.append(f"fid{args.fid}" + ("-perstep" if args.per_step else ""))
    if args.seed:
        parts.append(f"seed{args.seed}")
    return "-".join(parts) + ".json"


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
    parser.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="evaluate the EMA weights (--no-ema: the trained ones; default: EMA when the run has them)",
    )
    parser.add_argument("--fuzz-samples", type=int, default=8, help="samples for the sharpness measures")
    parser.add_argument("--chain-steps", type=int, default=4, help="Markov-chain steps K")
    parser.add_argument(
        "--mi-images",
        type=int,
        default=None,
        help="images in the MI estimate (default: 4096 for Gaussian posteriors (PixelVAE), whose MI is "
        "closed-form; 128 for others (iterative VAE), whose MI scores every pair)",
    )
    parser.add_argument("--fid", type=int, default=0, help="N for FID/KID/PR per sampling way (0: skip)")
    parser.add_argument("--per-step", action="store_true", help="FID of every generation step too")
    parser.add_argument("--fid-batch", type=int, default=50, help="images per generation/embedding chunk")
    parser.add_argument("--inception", default="", help="Inception TorchScript file (default: the wheel's)")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: RUN_DIR/eval/NAME.json and RUN_DIR/eval.json"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--device", default=None, help="default: this process's GPU, else the CPU")
    args = parser.parse_args(argv)
    if args.fid and (args.fid < 3 or args.fid_batch < 1):
        parser.error(f"--fid must be 0 or >= 3 and --fid-batch >= 1; got {args.fid} and {args.fid_batch}")
    if args.iw_samples < 0 or args.fuzz_samples < 2 or args.chain_steps < 0 or (args.mi_images or 2) < 2:
        parser.error(
            "--iw-samples and --chain-steps must be >= 0, --fuzz-samples and --mi-images >= 2; got "
            f"{args.iw_samples}, {args.chain_steps}, {args.fuzz_samples} and {args.mi_images}"
        )
    state = tool_state()
    caps = {} if args.mi_images is None else {"mi_images": args.mi_images}
    try:
        device = tool_device(args.device, state)
        run = load_run(args.run_dir, ema=args.ema, device=device)
        stream = ShardStream(
            run.cfg.data,
            args.split,
            rank=state.process_index,
            world_size=state.num_processes,
            batch_size=args.batch_size or run.cfg.data.batch_size,
            training=False,
        )
        if stream.total == 0:
            raise DataError(
                f"{run.cfg.data.path}: the {args.split} split is empty; nothing to evaluate (use --split "
                "train, or remake the shards with a larger --val-fraction)"
            )
        torch.manual_seed(args.seed + state.process_index)  # the ELBO's own posterior sample
        generator = torch.Generator(device).manual_seed(args.seed + state.process_index)
        quiet = args.no_progress or not state.is_main_process
        bar = tqdm(total=stream.rank_images, unit="img", desc=f"evaluate {args.split}", disable=quiet)
        with bar:
            part = accumulate(run.model, stream, args.iw_samples, generator, bar.update, **caps)
        parts = gather_object([part])
        quality = sample_quality(run.model, run.cfg.data, args, quiet) if args.fid else None
        if not state.is_main_process:
            state.wait_for_everyone()
            return 0
        result = summarize(parts, generator, **caps)
        if quality is not None:
            result["sample_quality"] = {"n": args.fid, "split": args.split, "ways": quality}
        data = next(iter(ShardStream(run.cfg.data, args.split, batch_size=args.fuzz_samples, training=False)))
        result["fuzziness"] = fuzziness(
            run.model, data.to(device), args.fuzz_samples, 4, args.chain_steps, generator
        )
    except DistVaeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.REFUSED
    result.update(
        split=args.split,
        step=run.step,
        checkpoint=str(run.checkpoint),
        ema=run.ema,
        processes=state.num_processes,
    )
    text = json.dumps(result, indent=2) + "\n"
    paths = (
        [args.out]
        if args.out
        else [RunDir(args.run_dir).eval / result_name(run.ema, args), RunDir(args.run_dir).latest_eval]
    )
    for path in paths:
        write_text_atomic(path, text)
    print(f"wrote {' and '.join(map(str, paths))}", file=sys.stderr)
    print(json.dumps(result, indent=2))
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
