"""Preemption contract with the cluster scripts: a signal asks for a checkpoint, exit code 3 a requeue.

SIGUSR1 and SIGTERM only set a flag; the trainer reads it at the next step boundary, agrees on it
across ranks (one all-reduce, so no rank leaves a collective behind), checkpoints and exits with
`REQUEUE_EXIT_CODE`. Because `accelerate launch`/torchrun may replace a worker's exit code by its
own, the trainer also writes `RUN_DIR/requeue`, which the cluster script can test instead.

This module imports only the standard library at load time, so train.py installs the handlers before
torch is imported (seconds, during which a signal would otherwise kill the process).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from types import FrameType

REQUEUE_EXIT_CODE = 3
REQUEUE_FILE = "requeue"
DONE_FILE = "done"
DIVERGED_FILE = "diverged"
HANDLED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    """Remembers that a handled signal arrived; installing replaces the previous handlers until `restore`."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionFlag:
        for sig in HANDLED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name


def write_requeue_marker(run_dir: Path, step: int, reason: str) -> None:
    """Tell the cluster script that the run stopped early and wants to be requeued (a `done` left by
    an earlier, shorter train.steps would tell it otherwise)."""
    from dist_vae.files import write_text_atomic  # imports torch: see the module docstring

    for stale in (DONE_FILE, DIVERGED_FILE):
        (run_dir / stale).unlink(missing_ok=True)
    write_text_atomic(run_dir / REQUEUE_FILE, f"step {step}\nreason {reason}\ntime {time.time():.0f}\n")


def write_done_marker(run_dir: Path, step: int) -> None:
    """Tell the cluster script (and a later `resume=auto`) that the run reached train.steps."""
    from dist_vae.files import write_text_atomic

    for stale in (REQUEUE_FILE, DIVERGED_FILE):
        (run_dir / stale).unlink(missing_ok=True)
    write_text_atomic(run_dir / DONE_FILE, f"step {step}\ntime {time.time():.0f}\n")


def write_diverged_marker(run_dir: Path, step: int, why: str) -> None:
    """Tell the cluster script that the run diverged: requeueing would only repeat it."""
    from dist_vae.files import write_text_atomic

    (run_dir / REQUEUE_FILE).unlink(missing_ok=True)
    write_text_atomic(run_dir / DIVERGED_FILE, f"step {step}\nreason {why}\ntime {time.time():.0f}\n")
