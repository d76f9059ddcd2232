"""A damaged shard costs its bad samples only: training keeps its batches, and the trainer logs how many
shards and samples were replaced (summed over ranks) and carries the count across a resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_vae.run_layout import RunDir
from tests.engine_util import check, python_cmd, run

STEPS = 19  # 76 of the 78 training images: nearly one epoch


def logged(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(RunDir(run_dir).tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.mark.slow
def test_bad_samples_are_logged_and_carried_across_a_resume(demo_shards: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    victim = sorted(shards.glob("train-*.tar"))[1]
    records = json.loads(victim.with_suffix(".idx.json").read_text())["samples"]
    victim.write_bytes(victim.read_bytes()[: records[4][2] + 10])  # truncated inside its 5th image
    overrides = [f"train.steps={STEPS}", "train.log_every=1", "train.checkpoint_every=10",
                 "train.eval_every=100", "train.sample_every=100"]  # fmt: skip

    whole = tmp_path / "whole"
    check(run(python_cmd(whole, shards, *overrides)))
    samples = logged(whole, "data/skipped_samples")
    assert [step for step, _ in samples] == list(range(1, STEPS + 1))
    values = [v for _, v in samples]
    assert values == sorted(values) and 0 < values[-1] <= len(records) - 4
    assert logged(whole, "data/skipped_shards")[-1][1] == 1

    halves = tmp_path / "halves"
    check(run(python_cmd(halves, shards, *overrides[1:], "train.steps=10")))
    check(run(python_cmd(halves, shards, *overrides)))
    # The resumed run starts from the checkpoint's count: the same total as the uninterrupted run.
    assert logged(halves, "data/skipped_samples")[-1] == samples[-1]
