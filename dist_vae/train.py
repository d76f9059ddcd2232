"""Train a VAE: `accelerate launch [--config_file A.yaml] dist_vae/train.py --config RUN.yaml k=v ...`.

Run with plain `python` it is the single-process debug mode (CPU or one GPU). The backend (DDP,
DeepSpeed ZeRO-1/2, CPU gloo) is chosen by the accelerate config file alone.

Exit codes: 0 when train.steps is reached (RUN_DIR/done is written), 3 (`REQUEUE_EXIT_CODE`) after a
SIGUSR1/SIGTERM checkpoint (RUN_DIR/requeue is written, since multi-process launchers may report
their own code instead), 2 for a bad configuration, unusable data or a checkpoint that cannot be
written (disk full, read-only run dir; the previous checkpoints are kept).

Signals under launchers (checked by tests/test_engine_signals.py): SIGUSR1 may go to the whole
process group (`kill -USR1 -- -PGID`, DataLoader workers included: they inherit the handler).
SIGTERM must go to the training processes or to a multi-process `accelerate launch` (torchrun
forwards it to its workers, then SIGKILLs them 30 s later), never to the whole group: PyTorch's
DataLoader workers die on a SIGTERM not sent by their parent, which aborts the trainer before it
saves. torchrun does not forward SIGUSR1 (and SIGKILLs its workers 30 s after forwarding a TERM), so
cluster/launch.sh sends USR1 to every process of the job's steps (`scancel --signal=USR1 JOBID`) while
the launchers ignore it. A single-process `accelerate launch` forwards nothing: signal the python process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_vae.config import ConfigError, load_config
from dist_vae.data.stream import DataError
from dist_vae.engine.checkpoint import CheckpointWriteError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="run configuration YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from dist_vae.engine.trainer import Trainer

        trainer = Trainer(cfg)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        code = trainer.fit()
    except CheckpointWriteError as exc:  # disk full or run dir not writable; older checkpoints are kept
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if trainer.accelerator.is_main_process:
        print(f"samples:     {trainer.logger.samples_dir}")
        print(f"tensorboard: tensorboard --logdir {trainer.logger.tensorboard_dir}")
        print(f"checkpoints: {Path(cfg.run_dir) / 'checkpoints'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
