"""A hang: rank 1 of a 2-process gloo run sleeps inside a step. Both ranks' watchdogs dump the
stacks of all threads, print one line and exit with ExitCode.HANG; a rerun resumes from the newest
checkpoint."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dist_vae.checkpoint import COMPLETE
from dist_vae.errors import ExitCode
from dist_vae.run_layout import RunDir
from tests.engine_util import env, free_port, python_cmd

HANG_TIMEOUT = 8
# Rank 1 sleeps before its training forward call 5 (making step 6): steps 2 and 4 are checkpointed.
OVERRIDES = ["train.steps=8", f"train.hang_timeout={HANG_TIMEOUT}", "train.eval_every=100",
             "train.sample_every=100", "data.num_workers=1"]  # fmt: skip


def start_group(run_dir: Path, shards: Path, logs: Path, **extra: str) -> list[subprocess.Popen]:
    """The two trainer processes of a gloo group, started the way torchrun starts them (by their
    environment), so that each rank's own exit code is seen rather than the launcher's. Their stderr
    goes to logs/rank-R.txt."""
    port, procs = free_port(), []
    logs.mkdir(parents=True)
    for rank in (0, 1):
        ranks = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        with open(logs / f"rank-{rank}.txt", "w") as log:
            cmd = python_cmd(run_dir, shards, *OVERRIDES)
            procs.append(subprocess.Popen(cmd, env=env(**ranks, **extra), stderr=log, text=True))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.mark.slow
def test_rank_sleeping_in_a_step_dumps_stacks_exits_and_rerun_resumes(
    demo_shards: Path, tmp_path: Path
) -> None:
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    procs = start_group(run_dir, demo_shards, logs, HARNESS_SLEEP_AT="1:5:600")
    workers: dict[int, list[psutil.Process]] = {0: [], 1: []}
    last_checkpoint = RunDir(run_dir).checkpoint(4) / COMPLETE
    deadline = time.monotonic() + 240
    while (
        not last_checkpoint.exists() and time.monotonic() < deadline and all(p.poll() is None for p in procs)
    ):
        for rank, p in enumerate(procs):  # each rank's DataLoader worker, once started
            with contextlib.suppress(psutil.NoSuchProcess):
                workers[rank] = workers[rank] or psutil.Process(p.pid).children()
        time.sleep(0.1)
    hang_began = time.monotonic()  # rank 1 sleeps in the step after the checkpoint of step 4
    wait_all(procs, HANG_TIMEOUT + 60)
    exited_after = time.monotonic() - hang_began
    for rank, p in enumerate(procs):
        err = (logs / f"rank-{rank}.txt").read_text()
        assert p.returncode == ExitCode.HANG, f"rank {rank}: exit {p.returncode}\n{err[-4000:]}"
        expected = f"error: rank {rank}: no step boundary after step 5 (train.hang_timeout={HANG_TIMEOUT})"
        assert expected in err and str(RunDir(run_dir).hang_stacks(rank)) in err, err[-4000:]
        assert workers[rank], f"rank {rank} started no DataLoader worker"
        _, alive = psutil.wait_procs(workers[rank], timeout=10)
        assert not alive, f"rank {rank}'s DataLoader workers outlived it: {alive}"
    assert exited_after < HANG_TIMEOUT + 60
    # The sleeper's stack names the sleeping frame; the other rank waits for it in DDP's gradient
    # all-reduce, inside the step's backward.
    assert "in sleep_inside_step" in RunDir(run_dir).hang_stacks(1).read_text()
    waiting = RunDir(run_dir).hang_stacks(0).read_text()
    assert "in _engine_run_backward" in waiting and "dist_vae/engine/step.py" in waiting, waiting

    procs = start_group(run_dir, demo_shards, tmp_path / "rerun")
    wait_all(procs, 180)
    err = (tmp_path / "rerun" / "rank-0.txt").read_text()
    assert [p.returncode for p in procs] == [0, 0], err[-4000:]
    assert "resumed from step 4" in err


def test_work_between_steps_has_its_own_bound_and_a_late_exception_keeps_the_hang_code(
    tmp_path: Path,
) -> None:
    """Evaluation or saving that outlasts train.action_timeout is a hang too. The main thread's exception
    after the dump (a peer that exited first breaks this rank's collective) must not replace exit 5."""
    script = (
        "import time; from dist_vae.engine.stops import Watchdog; from dist_vae.run_layout import RunDir\n"
        f"w = Watchdog(RunDir({str(tmp_path)!r}), 3, None, 1.0)\n"
        "with w.watching(2), w.between_steps(3):\n"
        "    time.sleep(2.0)\n"
        "    raise RuntimeError('Connection closed by peer')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == ExitCode.HANG, done.stderr
    assert done.stderr.startswith(
        "error: rank 3: evaluation, sampling or saving at step 3 unfinished (train.action_timeout=1)"
    )
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "line 4 in <module>" in RunDir(tmp_path).hang_stacks(3).read_text()


def test_a_rank_whose_peer_never_starts_is_refused_after_collective_timeout(
    demo_shards: Path, tmp_path: Path
) -> None:
    ranks = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # fmt: skip
    cmd = python_cmd(tmp_path / "run", demo_shards, "train.collective_timeout=3")
    done = subprocess.run(cmd, env=env(**ranks), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-4000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the process group did not form within train.collective_timeout=3 s"), last
