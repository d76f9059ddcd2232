"""The trainer's cadence: when it logs, runs the periodic actions (in their listed order) and saves."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from dist_vae.config import Config
from dist_vae.engine.periodic import Cadence, Periodic


def test_periodic_actions_run_in_order_and_log_and_save_points_fall_as_configured() -> None:
    cfg = Config()
    cfg.train = dataclasses.replace(cfg.train, steps=12, log_every=5, checkpoint_every=4)
    ran: list[tuple[str, int]] = []

    def record(name: str) -> Callable[[int], None]:
        return lambda step: ran.append((name, step))

    cadence = Cadence(cfg.train, [Periodic(3, record("eval")), Periodic(2, record("fid"))])
    for step in range(1, 13):
        cadence.run_actions(step)
    assert ran == [("fid", 2), ("eval", 3), ("fid", 4), ("eval", 6), ("fid", 6), ("fid", 8), ("eval", 9),
                   ("fid", 10), ("eval", 12), ("fid", 12)]  # fmt: skip
    assert [s for s in range(1, 13) if cadence.log_due(s, diverged=False)] == [5, 10, 12]
    assert cadence.log_due(7, diverged=True)
    assert [s for s in range(1, 13) if cadence.save_due(s, preempted=False)] == [4, 8, 12]
    assert cadence.save_due(7, preempted=True)
