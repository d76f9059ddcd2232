"""Bit-exact continuation: 8 steps == 4 + resume + 4, and kill -9 at random moments always resumes
(also under fp16, through an overflow the loss scaler skips)."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dist_vae.checkpoint import COMPLETE, complete_checkpoints
from dist_vae.run_layout import RunDir
from tests.engine_util import assert_same, check, checkpoint_contents, count_tensors, env, python_cmd, run

STEPS = 8
# The cosine/linear schedules end at train.steps, which the 4-step half changes; a constant schedule
# with a warm-up longer than the first half still shows a schedule that restarts on resume.
SCHEDULE = ["train.schedule=constant", "train.warmup=6", "data.num_workers=1"]
# fp16: a growth interval of 2 moves the scale every few updates (the first ones overflow by
# themselves), and update 4 overflows (tests/engine_harness.py), so kills land at varied scaler states.
PRECISION = {
    "fp32": ([], {}),
    "fp16": (["train.precision=fp16", "train.loss_scale_growth_interval=2"], {"HARNESS_OVERFLOW_AT": "3"}),
}


@pytest.fixture(scope="module")
def reference(
    demo_shards: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Path:
    """An uninterrupted 8-step run in the precision the test names (`request.param`)."""
    overrides, faults = PRECISION[request.param]
    run_dir = tmp_path_factory.mktemp("reference")
    check(run(python_cmd(run_dir, demo_shards, f"train.steps={STEPS}", *SCHEDULE, *overrides), **faults))
    return run_dir


def final_checkpoint(run_dir: Path) -> Path:
    step, path = complete_checkpoints(run_dir)[-1]
    assert step == STEPS
    return path


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["fp32"], indirect=True)
def test_four_plus_resume_plus_four_equals_eight(reference: Path, demo_shards: Path, tmp_path: Path) -> None:
    check(run(python_cmd(tmp_path, demo_shards, "train.steps=4", *SCHEDULE)))
    assert not RunDir(tmp_path).marker("done").exists() or RunDir(tmp_path).marker(
        "done"
    ).read_text().startswith("step 4")
    check(run(python_cmd(tmp_path, demo_shards, f"train.steps={STEPS}", *SCHEDULE, "resume=auto")))
    expected = checkpoint_contents(final_checkpoint(reference))
    resumed = checkpoint_contents(final_checkpoint(tmp_path))
    assert count_tensors(expected) > 20  # model, optimizer, EMA, RNG states
    assert_same(expected, resumed)


@pytest.mark.slow
@pytest.mark.parametrize("reference", list(PRECISION), indirect=True)
def test_sigkill_at_random_moments_always_resumes(
    reference: Path, demo_shards: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    overrides, faults = PRECISION[request.node.callspec.params["reference"]]
    rng = random.Random(1234)
    cmd = python_cmd(
        tmp_path, demo_shards, f"train.steps={STEPS}", *SCHEDULE, *overrides, "train.checkpoint_every=1"
    )
    kills = 0
    while kills < 3:
        proc = subprocess.Popen(cmd, env=env(**faults), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.monotonic()
        # Wait for the process to get going (imports take seconds), then kill at a random moment.
        while (
            not complete_checkpoints(tmp_path)[kills:]
            and proc.poll() is None
            and time.monotonic() - started < 120
        ):
            time.sleep(0.05)
        # Within a few steps of that checkpoint: from its first checkpoint to its end the run takes
        # ~1.8 s on this project's CPU, so a wait of up to 1.5 s let it finish unkilled (a CI flake).
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 2, "the run finished before it could be killed twice; make it longer"
    check(run(cmd, **faults))
    assert RunDir(tmp_path).marker("done").is_file()
    assert all((path / COMPLETE).is_file() for _, path in complete_checkpoints(tmp_path))
    assert not [p for p in RunDir(tmp_path).checkpoints.iterdir() if p.name.startswith(".tmp")]
    assert_same(
        checkpoint_contents(final_checkpoint(reference)), checkpoint_contents(final_checkpoint(tmp_path))
    )
