"""Train a VAE: `accelerate launch [--config_file A.yaml] dist_vae/train.py --config RUN.yaml k=v ...`.

Run with plain `python` it is the single-process debug mode (CPU or one GPU). The backend (DDP,
DeepSpeed ZeRO-1/2, CPU gloo) is chosen by the accelerate config file alone.

Exit codes: dist_vae/errors.py's ExitCode (the README's table): SUCCESS 0 (RUN_DIR/done written),
REFUSED 2 (one line `error: ...` naming the key or file), REQUEUE 3 (stopped by SIGUSR1/SIGTERM after
a checkpoint; RUN_DIR/requeue written, since multi-process launchers may report their own code),
DIVERGED 4 (nothing new saved), HANG 5 (each rank wrote RUN_DIR/hang/rank-R.txt), STORE_UNREACHABLE 6
(the object store failed past data.remote_retries: checkpointed, RUN_DIR/requeue written), INTERRUPTED 130
(Ctrl-C: checkpointed at the next step boundary, no marker; a second Ctrl-C exits at once). A run
directory already held by another trainer is REFUSED (its lease names the holder).

Signals (checked by tests/test_engine_signals.py): SIGUSR1 and SIGTERM only set a flag, installed
before anything else starts (a signal while the process group forms or a checkpoint loads still
exits 3 at the first step boundary). Both may go to the whole process group (`kill -USR1 -- -PGID`,
Slurm's `scancel --signal`): DataLoader workers ignore them and die with their parent, so the main
process alone decides and saves. Under a multi-process `accelerate launch`, torchrun forwards SIGTERM
(not SIGUSR1) to its workers and SIGKILLs them 30 s later, so cluster/launch.sh sends USR1 to every
process of the job's steps while the launchers ignore it. A single-process `accelerate launch`
forwards nothing: signal the python process (or its group).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Both stdlib only: the signal handlers are installed before torch loads.
from dist_vae.engine.stops import PreemptionFlag
from dist_vae.errors import DistVaeError, ExitCode
from dist_vae.run_layout import RunDir


def main(argv: list[str] | None = None) -> int:
    preemption = PreemptionFlag().install()
    try:
        return _run(argv, preemption)
    finally:
        preemption.restore()


def _run(argv: list[str] | None, preemption: PreemptionFlag) -> int:
    # Loaded after the handlers are in (main): these import torch.
    from dist_vae.checkpoint import CheckpointWriteError
    from dist_vae.config import load_config
    from dist_vae.data.storage import StoreUnreachable

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="run configuration YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from dist_vae.engine.step import TrainingDiverged
        from dist_vae.engine.trainer import Trainer

        trainer = Trainer(cfg, preemption)
    except StoreUnreachable as exc:  # before the first step: nothing to save, but worth trying again
        return _unreachable_at_start(cfg.run_dir, exc)
    except DistVaeError as exc:  # config, data, checkpoint or backend refused: one line
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.REFUSED
    try:
        code = trainer.fit()
    except CheckpointWriteError as exc:  # disk full or run dir not writable; older checkpoints are kept
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.REFUSED
    except TrainingDiverged as exc:
        if trainer.accelerator.is_main_process:
            print(f"error: {exc}", file=sys.stderr)
        return ExitCode.DIVERGED
    if trainer.accelerator.is_main_process:
        _print_outputs(RunDir(cfg.run_dir))
    return code


def _unreachable_at_start(run_dir: str, error: Exception) -> int:
    """The object store failed past its retries during start-up (the manifest): one line and the
    requeue marker that cluster/launch.sh reads (a multi-process launcher replaces the exit code)."""
    from dist_vae.checkpoint import complete_checkpoints
    from dist_vae.engine.stops import store_unreachable_line

    run = RunDir(run_dir)
    saved = complete_checkpoints(run.root)
    step = saved[-1][0] if saved else 0
    progress = f"nothing trained (newest checkpoint: step {step})"
    print(store_unreachable_line(run, step, error, progress), file=sys.stderr)
    return ExitCode.STORE_UNREACHABLE


def _print_outputs(run: RunDir) -> None:
    """Where the run's outputs are: only the ones that exist (a run stopped before its first sample
    grid has none)."""
    if run.samples.is_dir():
        print(f"samples:     {run.samples}")
    if run.tensorboard.is_dir():
        print(f"tensorboard: tensorboard --logdir {run.tensorboard}")
    if run.checkpoints.is_dir():
        print(f"checkpoints: {run.checkpoints}")


if __name__ == "__main__":
    sys.exit(main())
