"""Preemption contract: SIGUSR1/SIGTERM -> checkpoint at the next step boundary, exit 3, RUN_DIR/requeue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dist_vae.engine.checkpoint import COMPLETE, complete_checkpoints
from dist_vae.engine.preemption import REQUEUE_EXIT_CODE
from tests.engine_util import accelerate_cmd, check, env, python_cmd, run

LONG = ["train.steps=400", "train.checkpoint_every=1", "train.eval_every=1000", "train.sample_every=1000"]


def start_and_signal(
    cmd: list[str], run_dir: Path, sig: signal.Signals, group: bool = False
) -> subprocess.Popen:
    """Start a long run, wait until it is training (a first checkpoint exists), send `sig` to it
    (to its whole process group, DataLoader workers included, when `group`, as Slurm does)."""
    proc = subprocess.Popen(
        cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=group
    )
    deadline = time.monotonic() + 180
    while not complete_checkpoints(run_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"run ended before the signal: {proc.communicate()[1][-3000:]}"
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    return proc


def requeued_step(run_dir: Path) -> int:
    text = (run_dir / "requeue").read_text()
    step = int(text.split()[1])
    assert complete_checkpoints(run_dir)[-1][0] == step, "the newest checkpoint is not the requeue step"
    assert not (run_dir / "done").exists()
    return step


def test_sigusr1_checkpoints_and_exits_with_requeue_code(demo_shards: Path, tmp_path: Path) -> None:
    sig = signal.SIGUSR1
    cmd = python_cmd(tmp_path, demo_shards, *LONG, "data.num_workers=1")
    proc = start_and_signal(cmd, tmp_path, sig, group=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    step = requeued_step(tmp_path)
    assert f"reason {sig.name}" in (tmp_path / "requeue").read_text()
    # The requeued job continues from there and finishes.
    check(run(python_cmd(tmp_path, demo_shards, *LONG[1:], "data.num_workers=1", f"train.steps={step + 2}")))
    assert (tmp_path / "done").is_file() and not (tmp_path / "requeue").exists()
    assert complete_checkpoints(tmp_path)[-1][0] == step + 2


@pytest.mark.slow
def test_sigterm_to_multiprocess_launcher_checkpoints_every_rank(demo_shards: Path, tmp_path: Path) -> None:
    """torchrun (inside `accelerate launch`) forwards SIGTERM to both workers; both save, then stop."""
    proc = start_and_signal(
        accelerate_cmd("cpu_debug.yaml", tmp_path, demo_shards, *LONG), tmp_path, signal.SIGTERM
    )
    _, err = proc.communicate(timeout=150)
    assert proc.returncode != 0, "the launcher reported success for a preempted run"
    requeued_step(tmp_path)
    saved = complete_checkpoints(tmp_path)[-1][1]
    assert json.loads((saved / COMPLETE).read_text())["world_size"] == 2, err[-3000:]
