"""Random streams come from (seed, step, rank), not from checkpoints: the same triple gives the same
draws in any process, and a 2-process run resumed half way ends bit-identical to an uninterrupted one
(after a start in which the ranks found different checkpoints was refused)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_vae.checkpoint import complete_checkpoints
from dist_vae.engine.step import seed_everything_for_step, step_seed
from tests.engine_util import accelerate_cmd, assert_same, check, checkpoint_contents, run


def draws(seed: int, step: int, rank: int) -> tuple[float, float, list[float]]:
    seed_everything_for_step(seed, step, rank)
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_step_seeds_are_64_bit_and_distinct_per_triple() -> None:
    triples = [(s, t, r) for s in (0, 1) for t in (0, 1, 2, 1000) for r in (0, 1, 7)]
    seeds = {step_seed(*triple) for triple in triples}
    assert len(seeds) == len(triples) and all(0 <= s < 2**64 for s in seeds)
    assert max(seeds) >= 2**32  # more than numpy's 32 bits reach torch and python
    assert draws(3, 5, 1) == draws(3, 5, 1)
    assert draws(3, 5, 1) != draws(3, 5, 0) and draws(3, 5, 1) != draws(3, 6, 1)


@pytest.mark.slow
def test_two_process_run_resumed_half_way_is_bit_identical(demo_shards: Path, tmp_path: Path) -> None:
    # A constant schedule: the 2-step first half must not end its LR schedule early.
    overrides = [
        "train.checkpoint_every=2",
        "train.eval_every=100",
        "train.sample_every=100",
        "train.schedule=constant",
    ]
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    check(run(accelerate_cmd("cpu_debug.yaml", whole, demo_shards, *overrides, "train.steps=4")))
    check(run(accelerate_cmd("cpu_debug.yaml", halves, demo_shards, *overrides, "train.steps=2")))
    # Rank 1 sees no checkpoint (a stale listing): every rank refuses, and the resume below still holds.
    blind = run(accelerate_cmd("cpu_debug.yaml", halves, demo_shards, *overrides, "train.steps=4"),
                HARNESS_BLIND_RANK="1")  # fmt: skip
    refusal = f"error: the ranks found different checkpoints to resume in run_dir {halves} (steps 0 to 2)"
    assert blind.returncode != 0 and blind.stderr.count(refusal) == 2, blind.stderr[-3000:]  # both ranks
    check(run(accelerate_cmd("cpu_debug.yaml", halves, demo_shards, *overrides, "train.steps=4")))
    (step_a, a), (step_b, b) = complete_checkpoints(whole)[-1], complete_checkpoints(halves)[-1]
    assert step_a == step_b == 4
    assert_same(checkpoint_contents(a), checkpoint_contents(b))
