"""RUN_DIR/config.yaml says what trained the newest checkpoint, never what a later run only meant to.

A resume whose configuration differs from its checkpoint's prints one line per changed key; the new
configuration waits in `config.pending.yaml` until a checkpoint trained with it exists, then replaces
config.yaml and the change is appended to `config_changes.jsonl` (one JSON object a line: the step it
took effect from, the step of the first checkpoint it trained, {key: [old, new]}). A run that is
killed before that checkpoint, or that has nothing left to train, leaves config.yaml as it was.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_vae.config import Config, to_yaml
from dist_vae.files import fsync_dir, write_text_atomic
from dist_vae.run_dir import CONFIG_FILE

PENDING_FILE = "config.pending.yaml"
HISTORY_FILE = "config_changes.jsonl"


@dataclass(frozen=True)
class ConfigChange:
    """The keys this run changed against the checkpoint of `step` it resumes: {key: (old, new)}."""

    step: int
    changes: dict[str, tuple[Any, Any]]

    def lines(self) -> list[str]:
        return [f"{key}: {old} -> {new} from step {self.step}" for key, (old, new) in self.changes.items()]


def record_config(run_dir: Path, cfg: Config, change: ConfigChange, finished: bool) -> None:
    """Rank 0 at start: an unchanged (or new) configuration is config.yaml now; a changed one waits in
    the pending file, unless the run has nothing left to train (then it never trains anything)."""
    pending = run_dir / PENDING_FILE
    if not change.changes:
        write_text_atomic(run_dir / CONFIG_FILE, to_yaml(cfg))
    elif not finished:
        write_text_atomic(pending, to_yaml(cfg))
        return
    pending.unlink(missing_ok=True)


def promote_config(run_dir: Path, change: ConfigChange, saved_step: int) -> None:
    """Rank 0, once the checkpoint of `saved_step` (trained with the changed configuration) is
    complete: the pending file becomes config.yaml and the change joins the history."""
    os.replace(run_dir / PENDING_FILE, run_dir / CONFIG_FILE)
    fsync_dir(run_dir)
    entry = {
        "from_step": change.step,
        "checkpoint_step": saved_step,
        "time": round(time.time()),
        "changes": {key: list(pair) for key, pair in change.changes.items()},
    }
    # One short write with O_APPEND: a crash leaves whole lines, at worst a torn last one.
    with open(run_dir / HISTORY_FILE, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())
