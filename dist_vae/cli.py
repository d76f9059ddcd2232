"""The `dist-vae` command: one entry point over the same functions as tools/ and dist_vae/train.py.

    dist-vae shards --source demo --out data/demo/shards --resolution 32   # tools/make_shards.py
    dist-vae train --config debug [key=value ...]                          # dist_vae/train.py
    dist-vae sample RUN [--n N] [--seed S]                                 # tools/sample.py
    dist-vae evaluate RUN [--fid N]                                        # tools/evaluate.py
    dist-vae export RUN OUT [--dtype bf16] [--no-ema]                      # dist_vae/export.py
    dist-vae plan --config lsun_256_iterative --gpu-mem 80GiB              # tools/plan_memory.py
    dist-vae configs                                                       # the shipped configs

`--config NAME` takes a file path or the name of a shipped configuration (configs/NAME.yaml, package
data of an installed dist-vae). Exit codes are the README's (dist_vae/errors.py's ExitCode).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from dist_vae.errors import DistVaeError, ExitCode

COMMANDS = {
    "shards": "build tar shards from LSUN, an image folder or the demo data",
    "train": "train a VAE (one process; several: accelerate launch -m dist_vae.train)",
    "sample": "prior samples and Markov chains of a run as PNG grids",
    "evaluate": "bits/dim, FID and more of a run over a split",
    "export": "a run's weights as a folder in the Hugging Face Hub's layout",
    "plan": "parameters, FLOPs, memory and the largest batch per GPU",
    "configs": "list the shipped configurations",
}


def command_main(command: str) -> Callable[[list[str]], int | None]:
    """The `main(argv)` a subcommand runs, imported only when it is asked for."""
    if command == "shards":
        from dist_vae.commands.make_shards import main as run
    elif command == "train":
        from dist_vae.train import main as run
    elif command == "sample":
        from dist_vae.commands.sample import main as run
    elif command == "evaluate":
        from dist_vae.commands.evaluate import main as run
    elif command == "plan":
        from dist_vae.commands.plan_memory import main as run
    else:
        run = export_main if command == "export" else list_configs
    return run


def shipped_configs() -> Path:
    """The folder of shipped configurations: package data when installed, configs/ in a checkout."""
    return Path(__file__).resolve().parent / "configs"


def config_path(name: str) -> str:
    """`name` itself when it is a file, else the shipped configs/NAME.yaml; a name that is neither is
    passed on unchanged, so the config loader's own error names it."""
    shipped = shipped_configs() / f"{name.removesuffix('.yaml')}.yaml"
    return name if Path(name).is_file() or not shipped.is_file() else str(shipped)


def with_config_paths(argv: list[str]) -> list[str]:
    """argv with the value of `--config NAME` / `--config=NAME` resolved by `config_path`."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = config_path(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + config_path(arg.partition("=")[2])
    return out


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dist-vae export", description=COMMANDS["export"])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 halves the file")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="export the EMA weights (--no-ema: the trained ones)")  # fmt: skip
    args = parser.parse_args(argv)
    from dist_vae.export import export_run

    try:
        out = export_run(args.run_dir, args.out, args.dtype, args.ema)
    except DistVaeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.REFUSED
    print(out)
    return ExitCode.SUCCESS


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<9} {text}" for name, text in COMMANDS.items()]
        usage = "usage: dist-vae COMMAND [options]   (dist-vae COMMAND --help)\n\ncommands:\n"
        print(usage + "\n".join(lines), file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}", file=sys.stderr)
        return ExitCode.SUCCESS if argv[:1] in (["-h"], ["--help"]) else ExitCode.REFUSED
    command, rest = argv[0], with_config_paths(argv[1:])
    sys.argv[0] = f"dist-vae {command}"
    return int(command_main(command)(rest) or 0)


def list_configs(argv: list[str]) -> int:
    for path in sorted(shipped_configs().glob("*.yaml")):
        print(path.stem)
    return ExitCode.SUCCESS


if __name__ == "__main__":
    sys.exit(main())
