"""Continuing a run on another number of processes: what becomes of the global batch (`train.resize`).

The global batch is world size x per-rank batch x train.accumulate samples per update. A checkpoint
records the one it was trained with (`meta.global_batch`) and the one the run started with
(`meta.reference_global_batch`). Every learning rate in use is the configured one (train.lr,
train.critic_lr) times global batch / reference global batch, so:

  keep_global_batch  the resumed run keeps the checkpoint's global batch: train.accumulate is
                     recomputed for the configured per-rank batch, and if the new world size times the
                     per-rank batch does not divide the global batch, the per-rank batch becomes the
                     largest divisor of global batch / world size below the configured one. Learning
                     rates stay as they were. Impossible when the world size does not divide it.
  scale_lr           the resumed run keeps the configured per-rank batch and accumulation; the global
                     batch follows the world size and the learning rates scale linearly with it
                     (Goyal et al., 2017). A run that returns to its first global batch is back at
                     the configured rates.

Nothing changes when the world size and the configured batch give the checkpoint's global batch:
then the continuation is bit-exact.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_vae.checkpoint import STATE_FILE, read_json
from dist_vae.config import Config, ConfigError
from dist_vae.errors import CheckpointError


@dataclass(frozen=True)
class Resize:
    """How this run's batch and learning rates relate to the checkpoint it resumes (or starts afresh)."""

    policy: str
    step: int
    world: tuple[int, int]  # (checkpoint, this run)
    batch: tuple[int, int]  # per-rank batch (configured, used)
    accumulate: tuple[int, int]  # (configured, used)
    global_batch: tuple[int, int]  # (checkpoint, this run)
    reference_global_batch: int  # the global batch the run started with: the configured LRs' own

    @property
    def lr_scale(self) -> float:
        return self.global_batch[1] / self.reference_global_batch

    def line(self) -> str:
        """The one line rank 0 prints on resume; empty when the run continues unchanged."""
        (old_w, w), (old_g, g) = self.world, self.global_batch
        pairs = (("batch", self.batch), ("accumulate", self.accumulate))
        changes = [f"{name} {x} -> {y}" for name, (x, y) in pairs if x != y]
        if old_w == w and not changes and self.lr_scale == 1.0:
            return ""
        text = f"resumed step {self.step} on world size {old_w} -> {w}: {self.policy}, global batch "
        text += (
            f"{g}" if old_g == g else f"{old_g} -> {g}"
        ) + f" = {w} x {self.batch[1]} x {self.accumulate[1]}"
        if changes:
            text += f" ({', '.join(changes)})"
        if self.lr_scale != 1.0:
            text += f", lr x {self.lr_scale:g} ({g} / {self.reference_global_batch}, the first global batch)"
        return text

    def scalars(self) -> dict[str, float]:
        return {
            "run/world_size": self.world[1],
            "run/global_batch": self.global_batch[1],
            "run/lr_scale": self.lr_scale,
        }


def launched_world_size() -> int:
    """The number of processes the launcher started (torchrun and DeepSpeed set WORLD_SIZE), known
    before the process group exists, so that the batch is settled before the Accelerator reads it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _keep(global_batch: int, world: int, batch: int, path: Path) -> tuple[int, int]:
    """(per-rank batch, accumulate) giving `global_batch` on `world` processes, batch at most `batch`."""
    if global_batch % world:
        raise ConfigError(
            f"train.resize=keep_global_batch cannot keep the global batch {global_batch} of {path} "
            f"on {world} processes: {global_batch} is not a multiple of {world}; world sizes that keep it: "
            f"{_divisors(global_batch)}; or set train.resize=scale_lr to keep data.batch_size={batch} and "
            "scale the learning rates"
        )
    per_rank = global_batch // world
    fitting = max(d for d in _divisors(per_rank) if d <= batch)
    return fitting, per_rank // fitting


def resized_config(cfg: Config, batch: int, resume_from: Path | None, world: int) -> tuple[Config, Resize]:
    """`cfg` with the per-rank batch (`batch` as configured) and train.accumulate this run uses, and
    the Resize that says how; ConfigError before anything is written when the policy cannot hold."""
    accumulate = cfg.train.accumulate
    configured = world * batch * accumulate
    if resume_from is None:
        return cfg, Resize(cfg.train.resize, 0, (world, world), (batch, batch), (accumulate, accumulate),
                           (configured, configured), configured)  # fmt: skip
    state = read_json(resume_from / STATE_FILE)
    meta: dict[str, Any] = state.get("meta", {})
    saved = meta.get("global_batch")
    if not isinstance(saved, int) or not isinstance(state.get("world_size"), int):
        raise CheckpointError(f"{resume_from / STATE_FILE} lacks world_size or meta.global_batch (integers)")
    reference = meta.get("reference_global_batch", saved)
    new_batch, new_accumulate = batch, accumulate
    if cfg.train.resize == "keep_global_batch" and configured != saved:
        new_batch, new_accumulate = _keep(saved, world, batch, resume_from)
    resize = Resize(
        cfg.train.resize, state["step"], (state["world_size"], world), (batch, new_batch),
        (accumulate, new_accumulate), (saved, world * new_batch * new_accumulate), reference,
    )  # fmt: skip
    if (new_batch, new_accumulate) == (batch, accumulate):
        return cfg, resize
    data = dataclasses.replace(cfg.data, batch_size=new_batch)
    train = dataclasses.replace(cfg.train, accumulate=new_accumulate)
    return dataclasses.replace(cfg, data=data, train=train), resize
