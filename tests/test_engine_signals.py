"""Preemption contract: SIGUSR1/SIGTERM -> checkpoint at the next step boundary, exit 3, RUN_DIR/requeue;
during start-up (imports, process group, checkpoint load) -> exit 3 and the marker before any step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_vae.checkpoint import COMPLETE, complete_checkpoints
from dist_vae.config import load_config
from dist_vae.errors import ExitCode
from dist_vae.run_layout import RunDir
from tests.engine_util import ROOT, accelerate_cmd, check, env, python_cmd, run, train_args

LONG = ["train.steps=400", "train.checkpoint_every=1", "train.eval_every=1000", "train.sample_every=1000"]


def start_and_signal(
    cmd: list[str], run_dir: Path, sig: signal.Signals, group: bool = False
) -> subprocess.Popen:
    """Start a long run, wait until it is training (a first checkpoint exists), send `sig` to it
    (to its whole process group, DataLoader workers included, when `group`, as Slurm does)."""
    proc = subprocess.Popen(
        cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=group
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
    text = RunDir(run_dir).marker("requeue").read_text()
    step = int(text.split()[1])
    assert complete_checkpoints(run_dir)[-1][0] == step, "the newest checkpoint is not the requeue step"
    assert not RunDir(run_dir).marker("done").exists()
    return step


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=lambda s: s.name)
def test_a_signal_to_the_whole_group_checkpoints_and_exits_with_requeue_code(
    demo_shards: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    """As Slurm does: the signal reaches the DataLoader worker too, which leaves it to the trainer."""
    cmd = python_cmd(tmp_path, demo_shards, *LONG, "data.num_workers=1")
    proc = start_and_signal(cmd, tmp_path, sig, group=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.REQUEUE, err[-3000:]
    step = requeued_step(tmp_path)
    assert f"reason {sig.name}" in RunDir(tmp_path).marker("requeue").read_text()
    stopped = f"stopped by {sig.name} at step {step}; checkpoint {RunDir(tmp_path).checkpoint(step)}; run the"
    assert any(line.startswith(stopped) for line in err.splitlines()), err[-3000:]
    assert "samples:" not in out and "checkpoints:" in out  # no sample grid was due: no path to one
    # The requeued job continues from there and finishes.
    check(run(python_cmd(tmp_path, demo_shards, *LONG[1:], "data.num_workers=1", f"train.steps={step + 2}")))
    assert RunDir(tmp_path).marker("done").is_file() and not RunDir(tmp_path).marker("requeue").exists()
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


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler installed for `sig` (the kernel's SigCgt mask)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (sig - 1) & 1)


def test_a_signal_during_start_up_exits_3_before_the_first_step(demo_shards: Path, tmp_path: Path) -> None:
    args = train_args(tmp_path, demo_shards, *LONG[1:], "train.steps=2")
    check(run(python_cmd(tmp_path, demo_shards, *LONG[1:], "train.steps=2")))
    # Resume it for 400 steps and signal it ~1 s after start: while torch is imported, the process
    # group forms or the checkpoint loads. The handlers were installed before all that.
    cmd = [sys.executable, str(ROOT / "dist_vae" / "train.py"), *args, "train.steps=400"]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    while not catches(proc.pid, signal.SIGUSR1) and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.REQUEUE, err[-3000:]
    assert requeued_step(tmp_path) == 2  # no step was taken, nothing new saved
    assert "reason SIGUSR1" in RunDir(tmp_path).marker("requeue").read_text()
    assert f"stopped by SIGUSR1 at step 2; checkpoint {RunDir(tmp_path).checkpoint(2)}" in err
    # train.steps=400 trained nothing yet: config.yaml still says what trained step 2.
    assert load_config(RunDir(tmp_path).config).train.steps == 2
