"""Fault injection: a 2-process gloo run, its whole process tree killed with
SIGKILL at 6 random moments (half of them while a checkpoint is being written) and resumed each
time, ends with exactly the weights of an uninterrupted 2-process run. (One process killed at random
moments, fp32 and fp16: tests/test_engine_resume.py.)"""

from __future__ import annotations

import contextlib
import random
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from dist_vae.checkpoint import COMPLETE, complete_checkpoints
from dist_vae.run_layout import RunDir
from tests.engine_util import accelerate_cmd, assert_same, check, checkpoint_contents, env, run

STEPS = 30
KILLS = 6
OVERRIDES = [f"train.steps={STEPS}", "train.checkpoint_every=1", "train.log_every=1", "train.eval_every=7",
             "train.sample_every=100", "train.schedule=constant", "train.warmup=6"]  # fmt: skip


def newest_step(run_dir: Path) -> int:
    found = complete_checkpoints(run_dir)
    return found[-1][0] if found else 0


def writing_checkpoint(run_dir: Path, since: float) -> bool:
    """A checkpoint write begun after `since` (a killed run's torn one stays until the next start)."""
    root = RunDir(run_dir).checkpoints
    with contextlib.suppress(FileNotFoundError):  # the trainer may rename or remove it meanwhile
        return any(p.name.startswith(".tmp-step-") and p.stat().st_mtime > since for p in root.iterdir())
    return False


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every descendant (torchrun starts its workers in new sessions)."""
    tree = [psutil.Process(proc.pid)]
    with contextlib.suppress(psutil.NoSuchProcess):
        tree += tree[0].children(recursive=True)
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()
    psutil.wait_procs(tree, timeout=30)


@pytest.mark.slow
def test_two_process_run_killed_six_times_ends_bit_exact(demo_shards: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    check(run(accelerate_cmd("cpu_debug.yaml", reference, demo_shards, *OVERRIDES), timeout=300))
    killed = tmp_path / "killed"
    rng = random.Random(11)
    moments = []
    for kill in range(KILLS):
        assert newest_step(killed) < STEPS, f"the run finished after {kill} kills; make it longer"
        cmd = accelerate_cmd("cpu_debug.yaml", killed, demo_shards, *OVERRIDES)
        launched, start = time.time(), newest_step(killed)
        proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Every other kill lands inside a checkpoint write begun by this launch, the others at a random
        # time from the launch (start-up, loading, training), but before it gets 2 steps further, so
        # that all the kills fit in the run however fast the machine is.
        if kill % 2 == 0:
            deadline = time.monotonic() + 180
            while (
                not writing_checkpoint(killed, launched)
                and proc.poll() is None
                and time.monotonic() < deadline
            ):
                time.sleep(0.005)
            moments.append("checkpoint write" if writing_checkpoint(killed, launched) else "?")
        else:
            deadline = time.monotonic() + rng.uniform(2.0, 12.0)
            while time.monotonic() < deadline and newest_step(killed) < start + 2 and proc.poll() is None:
                time.sleep(0.005)
            moments.append("random")
        assert proc.poll() is None, f"the run ended on its own before kill {kill + 1}"
        kill_tree(proc)
    assert moments.count("checkpoint write") == KILLS // 2, moments
    check(run(accelerate_cmd("cpu_debug.yaml", killed, demo_shards, *OVERRIDES), timeout=300))
    assert RunDir(killed).marker("done").is_file()
    assert all((path / COMPLETE).is_file() for _, path in complete_checkpoints(killed))
    expected, resumed = complete_checkpoints(reference)[-1], complete_checkpoints(killed)[-1]
    assert expected[0] == resumed[0] == STEPS
    assert_same(checkpoint_contents(expected[1]), checkpoint_contents(resumed[1]))
