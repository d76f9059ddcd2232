"""Train a VAE: `accelerate launch [--config_file A.yaml] dist_vae/train.py --config RUN.yaml k=v ...`.

Run with plain `python` it is the single-process debug mode (CPU or one GPU). The backend (DDP,
DeepSpeed ZeRO-1/2, CPU gloo) is chosen by the accelerate config file alone.

Exit codes:
  0  train.steps reached; RUN_DIR/done is written (a rerun of a finished run says so in one line).
  2  bad configuration, unusable data, a checkpoint that cannot be written (disk full, read-only run
     dir; the previous checkpoints are kept), a process group that did not form within
     train.collective_timeout: one line `error: ...` naming the key or file.
  3  (`REQUEUE_EXIT_CODE`) stopped by SIGUSR1/SIGTERM after a checkpoint; RUN_DIR/requeue is written,
     since multi-process launchers may report their own code instead; one line
     `stopped by SIGTERM at step N; checkpoint PATH; run the same command again to resume`.
  4  diverged: train.max_nonfinite_skips non-finite updates in a row. Nothing new is saved; one line
     `error: training diverged: N consecutive non-finite updates since step S; last good checkpoint: PATH`.
  5  (`HANG_EXIT_CODE`) hung: no step boundary within train.hang_timeout, or evaluation/sampling/saving
     past train.action_timeout (engine/watchdog.py). Each rank writes RUN_DIR/hang/rank-R.txt (the
     stacks of all its threads) and prints one line `error: rank R: ...; stacks of all threads in PATH`.

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

from dist_vae.engine.preemption import PreemptionFlag  # stdlib only: installed before torch loads

DIVERGED_EXIT_CODE = 4


def main(argv: list[str] | None = None) -> int:
    preemption = PreemptionFlag().install()
    try:
        return _run(argv, preemption)
    finally:
        preemption.restore()


def _run(argv: list[str] | None, preemption: PreemptionFlag) -> int:
    from dist_vae.checkpoint import CheckpointWriteError, checkpoint_root
    from dist_vae.config import load_config
    from dist_vae.errors import DistVaeError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="run configuration YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from dist_vae.engine.skip import TrainingDiverged
        from dist_vae.engine.trainer import Trainer

        trainer = Trainer(cfg, preemption)
    except DistVaeError as exc:  # config, data, checkpoint or backend refused: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        code = trainer.fit()
    except CheckpointWriteError as exc:  # disk full or run dir not writable; older checkpoints are kept
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        if trainer.accelerator.is_main_process:
            print(f"error: {exc}", file=sys.stderr)
        return DIVERGED_EXIT_CODE
    if trainer.accelerator.is_main_process:
        _print_outputs(
            trainer.logger.samples_dir, trainer.logger.tensorboard_dir, checkpoint_root(Path(cfg.run_dir))
        )
    return code


def _print_outputs(samples: Path, tensorboard: Path, checkpoints: Path) -> None:
    """Where the run's outputs are: only the ones that exist (a run stopped before its first sample
    grid has none)."""
    if samples.is_dir():
        print(f"samples:     {samples}")
    if tensorboard.is_dir():
        print(f"tensorboard: tensorboard --logdir {tensorboard}")
    if checkpoints.is_dir():
        print(f"checkpoints: {checkpoints}")


if __name__ == "__main__":
    sys.exit(main())
