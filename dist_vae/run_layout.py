"""Where everything of one run lives: the one type that knows a run directory's paths and markers.

The standard library only, so that train.py can name the markers before torch loads and every layer
(checkpoint/, engine/, the tools, the tests and cluster/launch.sh's constants) finds a run's files
through the same names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_CHECKPOINT_NAME = re.compile(r"^step-(\d{8})$")


@dataclass(frozen=True)
class RunDir:
    """One run = one directory: `RunDir("runs/demo").checkpoints`, `.marker("done")`, ..."""

    root: Path

    MARKERS = ("done", "requeue", "diverged")

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        """What trained the newest checkpoint (never ahead of it)."""
        return self.root / "config.yaml"

    @property
    def lease(self) -> Path:
        """The owner's lease (dist_vae/lease.py): one trainer at a time per run directory."""
        return self.root / ".lease.json"

    @property
    def pending_config(self) -> Path:
        """A changed configuration, until a checkpoint trained with it exists."""
        return self.root / "config.pending.yaml"

    @property
    def config_changes(self) -> Path:
        """One JSON object a line per change that reached a checkpoint."""
        return self.root / "config_changes.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int, tmp: bool = False) -> Path:
        return self.checkpoints / f"{'.tmp-' if tmp else ''}step-{step:08d}"

    @staticmethod
    def checkpoint_step(path: Path) -> int | None:
        """The step a checkpoint directory's name holds; None for any other name (a temporary)."""
        found = _CHECKPOINT_NAME.match(path.name)
        return int(found.group(1)) if found else None

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def trackers(self) -> Path:
        """The wandb and MLflow run ids of this run ({tracker: id}), so a resume appends to them."""
        return self.root / "trackers.json"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    def sample_grid(self, step: int) -> Path:
        """The trainer's grid at `step`."""
        return self.samples / f"step-{step:08d}.png"

    def sample_set(self, step: int) -> Path:
        """tools/sample.py's grids of the checkpoint of `step`, one PNG per kind."""
        return self.samples / f"step-{step:08d}"

    @property
    def eval(self) -> Path:
        """Evaluation results, one file per set of options (tools/evaluate.py)."""
        return self.root / "eval"

    @property
    def latest_eval(self) -> Path:
        return self.root / "eval.json"

    @property
    def hang(self) -> Path:
        return self.root / "hang"

    def hang_stacks(self, rank: int) -> Path:
        return self.hang / f"rank-{rank}.txt"

    def marker(self, name: str) -> Path:
        """`done`, `requeue` or `diverged`: how the run ended, for the cluster script."""
        if name not in self.MARKERS:
            raise ValueError(f"unknown run marker {name!r}; expected one of {', '.join(self.MARKERS)}")
        return self.root / name
