"""What every stage of the scenes study shares: running one of the project's CLIs with its console in
a log, and training (or resuming) one study run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def tool(*args: str, log: Path) -> None:
    """One of the project's CLIs, its console in `log`; a failure stops the study with that log's path."""
    with log.open("a") as console:
        code = subprocess.run(
            [sys.executable, *args], cwd=ROOT, env=ENV, stdout=console, stderr=console
        ).returncode
    if code:
        sys.exit(f"scenes_study.py: error: {args[0]} exited {code}; see {log}")


def train_run(run_dir: Path, config: str, shards: Path, side: int, steps: int, *overrides: str) -> None:
    """Train (or resume) one study run; it checkpoints, evaluates and samples once, at its end."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tool(
        "dist_vae/train.py", "--config", config, f"run_dir={run_dir}", f"data.path={shards}",
        f"data.resolution={side}", f"train.steps={steps}", f"train.checkpoint_every={steps}",
        f"train.eval_every={steps}", f"train.sample_every={steps}", "train.compile=off", *overrides,
        log=run_dir / "train.log",
    )  # fmt: skip
