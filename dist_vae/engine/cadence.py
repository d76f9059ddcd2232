"""When things happen between steps: log points, the periodic actions (evaluation, samples) and
checkpoints. A new periodic action is one more `Periodic` in `periodic_actions`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dist_vae.config import Config
from dist_vae.engine.evaluation import Evaluation


@dataclass(frozen=True)
class Periodic:
    """`action(step)` after every `every`-th step; collective actions run on every rank."""

    every: int
    action: Callable[[int], None]


def periodic_actions(cfg: Config, evaluation: Evaluation, validate: bool) -> list[Periodic]:
    """In the order they run at a step where several are due."""
    t = cfg.train
    actions = [Periodic(t.eval_every, evaluation.log_val_bpd)] if validate else []
    if cfg.eval.fid_every:
        actions.append(Periodic(cfg.eval.fid_every, evaluation.log_sample_quality))
    return [*actions, Periodic(t.sample_every, evaluation.log_samples)]


class Cadence:
    def __init__(self, cfg: Config, actions: list[Periodic]) -> None:
        self.train, self.actions = cfg.train, actions

    def log_due(self, step: int, diverged: bool) -> bool:
        """Every train.log_every steps, at the last step, and before a divergence stops the run."""
        return diverged or step % self.train.log_every == 0 or step == self.train.steps

    def run_actions(self, step: int) -> None:
        for periodic in self.actions:
            if step % periodic.every == 0:
                periodic.action(step)

    def save_due(self, step: int, preempted: bool) -> bool:
        """Every train.checkpoint_every steps, at the last step, and before a preempted run stops."""
        return preempted or step % self.train.checkpoint_every == 0 or step == self.train.steps
