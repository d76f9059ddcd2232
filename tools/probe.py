"""Train the factor probe of a scenes shard directory and print its held-out scores.

    python tools/make_shards.py --source scenes:10000 --out shards/scenes64 --resolution 64 \
        --val-fraction 0.05 --workers 2
    python tools/probe.py train shards/scenes64          # -> shards/scenes64/probe/
    python tools/probe.py show shards/scenes64           # the cached probe's scores
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from dist_vae.errors import DistVaeError, ExitCode
from dist_vae.metrics.probe import TrainSettings, load_probe, train_probe


def print_report(report: dict[str, Any]) -> None:
    print(f"held-out scores on val ({report['val']} images; trained on {report['train']}):")
    for name, value in report.items():
        if "/" in name:
            factor, kind = name.split("/")
            print(f"  {factor:<12} {'accuracy' if kind == 'accuracy' else 'R²':<8} {value:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=("train", "show"))
    parser.add_argument("shards", help="a shard directory made with --source scenes:N")
    parser.add_argument("--epochs", type=int, default=TrainSettings.epochs)
    parser.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    parser.add_argument("--lr", type=float, default=TrainSettings.lr)
    parser.add_argument("--width", type=int, default=TrainSettings.width, help="channels of the first layer")
    parser.add_argument("--seed", type=int, default=TrainSettings.seed)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N train images only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.command == "train":
            settings = TrainSettings(args.epochs, args.batch_size, args.lr, args.width, args.seed, args.limit)
            train_probe(args.shards, settings)
        print_report(load_probe(args.shards)[1])
    except DistVaeError as exc:
        print(f"probe.py: error: {exc}", file=sys.stderr)
        return ExitCode.REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
