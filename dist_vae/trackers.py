"""Experiment trackers beside TensorBoard: `log.trackers` (default [tensorboard]) may add `wandb` and
`mlflow`, driven through accelerate's tracker classes on the main process only.

Each gets what TensorBoard gets: every log point's scalars at its step, the sample grids as images
(key `samples`), and once, when the tracker run is created, the resolved configuration as
hyperparameters (dotted keys). The tracker run's id is kept in the run directory
(`RunDir.trackers`), so a resumed run appends to the same wandb run and the same MLflow run.
Settings come from each library's own environment variables: `WANDB_MODE=offline`, `WANDB_PROJECT`;
`MLFLOW_TRACKING_URI` (default: a file store in RUN_DIR/mlruns), `MLFLOW_EXPERIMENT_NAME`.
A tracker whose package is missing stops the run before its first step (exit 2) naming the extra.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dist_vae.files import write_text_atomic
from dist_vae.run_layout import RunDir
from dist_vae.schema import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


@dataclass
class LogConfig:
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # also wandb, mlflow
    project: str = "dist-vae"  # the wandb project and the MLflow experiment (env variables win)


def check_trackers(cfg: LogConfig) -> None:
    """ConfigError for an unknown tracker name or one whose package is not installed."""
    for name in cfg.trackers:
        if name not in TRACKERS:
            raise ConfigError(f"bad value {name!r} in 'log.trackers'; expected some of {list(TRACKERS)}")
        try:
            importlib.import_module(PACKAGES[name])
        except ImportError as exc:
            raise ConfigError(
                f"log.trackers names {name}, whose package is not installed: pip install 'dist-vae[{name}]'"
            ) from exc


def flat(values: Any, prefix: str = "") -> dict[str, Any]:
    """A (nested) dataclass or dict as {dotted key: scalar}; lists as their text."""
    if dataclasses.is_dataclass(values):
        values = dataclasses.asdict(values)  # type: ignore[arg-type]
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


class Trackers:
    """The main process's wandb and MLflow runs (none: every method does nothing)."""

    def __init__(self, run: RunDir, cfg: LogConfig, hyperparameters: dict[str, Any]) -> None:
        self.run, self.trackers = run, {}
        ids = json.loads(run.trackers.read_text()) if run.trackers.is_file() else {}
        fresh = {}
        for name in cfg.trackers:
            if name == "wandb":
                self.trackers[name], fresh[name] = self._wandb(cfg, ids.get(name))
            elif name == "mlflow":
                self.trackers[name], fresh[name] = self._mlflow(cfg, ids.get(name))
        for name, tracker in self.trackers.items():
            if fresh[name]:  # MLflow's parameters cannot change; a resumed run keeps its first ones
                tracker.store_init_configuration(hyperparameters)
        if self.trackers:
            ids.update({name: self._id(name, t) for name, t in self.trackers.items()})
            write_text_atomic(run.trackers, json.dumps(ids, indent=2) + "\n")

    def _wandb(self, cfg: LogConfig, run_id: str | None) -> tuple[Any, bool]:
        from accelerate.tracking import WandBTracker

        project = os.environ.get("WANDB_PROJECT", cfg.project)
        tracker = WandBTracker(project, id=run_id or secrets.token_hex(4), resume="allow",
                               dir=str(self.run.root), name=self.run.root.name)  # fmt: skip
        tracker.start()
        return tracker, run_id is None

    def _mlflow(self, cfg: LogConfig, run_id: str | None) -> tuple[Any, bool]:
        import mlflow
        from accelerate.tracking import MLflowTracker

        if not os.environ.get("MLFLOW_TRACKING_URI"):  # no server, no database: files in the run
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for a database
            mlflow.set_tracking_uri((self.run.root / "mlruns").resolve().as_uri())
        tracker = MLflowTracker(cfg.project, run_id=run_id, run_name=self.run.root.name)
        tracker.start()
        return tracker, run_id is None

    @staticmethod
    def _id(name: str, tracker: Any) -> str:
        return tracker.tracker.id if name == "wandb" else tracker.tracker.info.run_id

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers.values():
            tracker.log(values, step=step)

    def image(self, key: str, grid: np.ndarray, step: int) -> None:
        """A uint8 HWC picture at `step`."""
        if "wandb" in self.trackers:
            self.trackers["wandb"].log_images({key: [grid]}, step=step)
        if "mlflow" in self.trackers:
            import mlflow

            mlflow.log_image(grid, key=key, step=step)

    def close(self) -> None:
        for tracker in self.trackers.values():
            tracker.finish()
        self.trackers = {}
