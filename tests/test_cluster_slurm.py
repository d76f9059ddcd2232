"""cluster/*.sh under a real Slurm on localhost, with the real trainer on real demo shards.

The cluster has two nodes (two slurmd on this host). Job 1 runs to the end on one node under `sbatch --wait`.
Job 2 runs on both nodes, gets the preemption warning the way `--signal=B:USR1@N` delivers it (to the batch
shell only: `scancel --signal=USR1 --batch`), checkpoints, requeues itself, resumes and finishes. Job 3
crashes and is requeued once (MAX_CRASH_REQUEUES), then given up. Job 4 is cancelled and stays cancelled.
Job 5 hangs (one trainer process stopped with SIGSTOP, so the other waits in a collective until its watchdog
ends it), is requeued (MAX_HANG_REQUEUES) and finishes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from dist_vae.run_layout import RunDir
from tests.data_fixtures import make_demo_shards
from tests.slurm_jobs import (
    CPUS,
    FINAL_STATES,
    QUIET,
    assert_in_order,
    complete_checkpoints,
    job_env,
    job_log,
    scalar_steps,
    submit_self,
    trainer_process,
    wait_for_first_checkpoint,
    wait_requeued_once_and_completed,
)
from tests.slurm_local import LocalSlurm, ensure_commands

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "cluster").glob("*.sh"))


def _skip_unless(reason: str | None) -> None:
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_shards(tmp_path_factory.mktemp("shards") / "demo32", 64, 32, 0.5)


def test_scripts_pass_bash_n_and_shellcheck() -> None:
    assert {p.name for p in SCRIPTS} >= {"launch.sh", "node.sh", "lsun_256.sh", "lsun_64_pixelvae.sh"}
    for script in SCRIPTS:
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, f"bash -n {script}: {done.stderr}"
    _skip_unless(ensure_commands({"shellcheck": "shellcheck"}))
    done = subprocess.run(
        ["shellcheck", "-x", *(str(p.relative_to(REPO)) for p in SCRIPTS)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"DATA": "/nonexistent/shards"}, "DATA=/nonexistent/shards: no such directory"),
        ({"CONFIG": "configs/nope.yaml"}, "CONFIG=configs/nope.yaml: no such file"),
        ({"NODES": "two"}, "NODES=two: expected a positive integer"),
    ],
)
def test_bad_settings_are_named_before_anything_is_submitted(
    tmp_path: Path, override: dict[str, str], message: str
) -> None:
    env = job_env(dict(os.environ), tmp_path, tmp_path / "run", "")
    env.pop("SLURM_CONF", None)
    env.update(override)
    done = subprocess.run(
        [str(REPO / "cluster/lsun_256.sh")], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sbatch_wait_runs_to_the_end(slurm: LocalSlurm, shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = job_env(slurm.env, shards, run_dir, f"train.steps=10 train.checkpoint_every=5 {QUIET}")
    # Plain sbatch from the repository root: the allocation comes from the command line, the rest from env.
    done = subprocess.run(
        ["sbatch", "--wait", "--parsable", "--nodes=1", "--gres=none", f"--cpus-per-task={CPUS}",
         f"--output={run_dir}/slurm-%j.out", "cluster/lsun_256.sh"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    job_id = done.stdout.strip().split(";")[0]
    log = job_log(run_dir, job_id)
    assert done.returncode == 0, f"sbatch --wait: {done.returncode} {done.stderr}\n{log}\n{slurm.logs()}"
    assert_in_order(
        log,
        [
            rf"job {job_id}, run 1 \(restart count 0\)",
            r"resuming from newest complete checkpoint: none",
            r"launchers exited with status 0; newest complete checkpoint: step-00000010",
            r"training finished .*not requeueing",
        ],
    )
    assert "requeueing job" not in log
    assert complete_checkpoints(run_dir)[-1] == 10
    assert RunDir(run_dir).marker("done").exists() and not RunDir(run_dir).marker("requeue").exists()
    assert max(scalar_steps(run_dir)) >= 5


@pytest.mark.slow
def test_warning_signal_checkpoints_requeues_and_resumes(
    slurm: LocalSlurm, shards: Path, tmp_path: Path
) -> None:
    steps = 30
    run_dir = tmp_path / "run"
    env = job_env(
        slurm.env, shards, run_dir, f"train.steps={steps} train.checkpoint_every=5 {QUIET}", NODES="2"
    )
    # The script submits itself (outside a job it calls sbatch), from anywhere: NODES/GPUS_PER_NODE -> sbatch.
    # The debug accelerate config's 2 processes become one per node.
    job_id = submit_self(env, tmp_path)

    wait_for_first_checkpoint(slurm, job_id, run_dir)
    # What `#SBATCH --signal=B:USR1@600` does at the time limit minus 10 minutes.
    slurm.run("scancel", "--signal=USR1", "--batch", job_id)

    log = wait_requeued_once_and_completed(slurm, job_id, run_dir)
    _, marker, requeue, _, resumed, finished = assert_in_order(
        log,
        [
            r"received SIGUSR1 \(preemption warning\)",
            r"trainer checkpointed for preemption \(.*requeue: step (\d+)",
            r"requeueing job \d+ \(preempted\); the next run resumes from step-(\d+)",
            rf"job {job_id}, run 2 \(restart count 1\) on .*: 2 node\(s\)",
            r"resuming from newest complete checkpoint: step-(\d+)",
            rf"launchers exited with status 0; newest complete checkpoint: step-{steps:08d}",
        ],
    )
    stopped = int(marker.group(1))
    assert 0 < stopped < steps, f"the signal should land mid-run, the trainer stopped at {stopped}"
    assert int(requeue.group(1)) == int(resumed.group(1)) == stopped
    assert "training finished" in log[finished.end() :]
    assert complete_checkpoints(run_dir)[-1] == steps
    assert RunDir(run_dir).marker("done").exists()
    logged = scalar_steps(run_dir)
    assert max(logged) >= steps - 5 and min(logged) <= stopped, sorted(logged)


@pytest.mark.slow
def test_crash_is_requeued_at_most_max_crash_requeues(
    slurm: LocalSlurm, shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    env = job_env(slurm.env, shards, run_dir, "train.no_such_key=1", MAX_CRASH_REQUEUES="1")
    job_id = submit_self(env, tmp_path)
    info = slurm.wait_job(job_id, lambda i: i["JobState"] in FINAL_STATES and i["Restarts"] != "0", 240)
    log = job_log(run_dir, job_id)
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "1"), f"{info}\n{log}"
    assert info["ExitCode"] != "0:0"
    assert_in_order(
        log,
        [
            r"no_such_key",
            r"requeueing job \d+ \(crash 1 of at most 1\)",
            rf"job {job_id}, run 2 \(restart count 1\)",
            r"crashed \(status \d+\) and already requeued 1 time\(s\) after a crash .*not requeueing",
        ],
    )


@pytest.mark.slow
def test_scancel_stops_the_job_without_requeue(slurm: LocalSlurm, shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = job_env(slurm.env, shards, run_dir, f"train.steps=100000 train.checkpoint_every=5 {QUIET}")
    job_id = submit_self(env, tmp_path)
    wait_for_first_checkpoint(slurm, job_id, run_dir)
    slurm.run("scancel", job_id)
    info = slurm.wait_job(job_id, lambda i: i["JobState"] in FINAL_STATES, 60)
    log = job_log(run_dir, job_id)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), f"{info}\n{log}"
    # Slurm SIGKILLs whatever is left KillWait seconds after the SIGTERM, the batch shell included, so its
    # closing line may be missing; the state (CANCELLED, no restart) is what counts.
    assert "received SIGTERM: Slurm is ending the job" in log, log
    assert "requeueing job" not in log


@pytest.mark.slow
def test_requeue_onto_fewer_nodes_continues_the_run(slurm: LocalSlurm, shards: Path, tmp_path: Path) -> None:
    """NODES=1-2: the job starts on both nodes (2 processes), one node is drained while it runs, and the
    requeued job gets the one node left (1 process) and finishes the run from the preemption checkpoint."""
    steps = 30
    run_dir = tmp_path / "run"
    env = job_env(
        slurm.env, shards, run_dir, f"train.steps={steps} train.checkpoint_every=5 {QUIET}",
        NODES="1-2", PROCS_PER_NODE="1",
    )  # fmt: skip
    job_id = submit_self(env, tmp_path)
    wait_for_first_checkpoint(slurm, job_id, run_dir)
    drained = slurm.nodes[-1]
    slurm.run("scontrol", "update", f"NodeName={drained}", "State=DRAIN", "Reason=elastic-test")
    try:
        slurm.run("scancel", "--signal=USR1", "--batch", job_id)
        info = slurm.wait_job(
            job_id,
            lambda i: (
                i["JobState"] in FINAL_STATES and (i["Restarts"] != "0" or i["JobState"] != "COMPLETED")
            ),
            300,
        )
    finally:
        slurm.run("scontrol", "update", f"NodeName={drained}", "State=RESUME", check=False)
    log = job_log(run_dir, job_id)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "1", "0:0"), (
        f"{info}\n{log}"
    )
    _, marker, _, resumed, _ = assert_in_order(
        log,
        [
            rf"job {job_id}, run 1 \(restart count 0\) on .*: 2 node\(s\) x 0 GPU\(s\), 1 process",
            r"trainer checkpointed for preemption \(.*requeue: step (\d+)",
            rf"job {job_id}, run 2 \(restart count 1\) on .*: 1 node\(s\) x 0 GPU\(s\), 1 process",
            r"resuming from newest complete checkpoint: step-(\d+)",
            rf"launchers exited with status 0; newest complete checkpoint: step-{steps:08d}",
        ],
    )
    assert int(marker.group(1)) == int(resumed.group(1))
    assert re.search(r"world size 2 -> 1", log), log[-6000:]
    assert RunDir(run_dir).marker("done").exists()
    print("\n".join(line for line in log.splitlines() if line.startswith("[cluster") or "world size" in line))


@pytest.mark.slow
def test_hang_is_requeued_and_the_run_resumes(slurm: LocalSlurm, shards: Path, tmp_path: Path) -> None:
    steps = 30
    run_dir = tmp_path / "run"
    extra = f"train.steps={steps} train.checkpoint_every=5 train.hang_timeout=10 {QUIET}"
    job_id = submit_self(job_env(slurm.env, shards, run_dir, extra, MAX_HANG_REQUEUES="1"), tmp_path)
    wait_for_first_checkpoint(slurm, job_id, run_dir)
    # A frozen peer: rank 1 stops where it is, and rank 0 waits for it in the step's collective.
    stopped = trainer_process(run_dir, 1)
    stopped.send_signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 120
        while not RunDir(run_dir).hang_stacks(0).exists():
            assert time.monotonic() < deadline, f"no hang file after 120 s:\n{job_log(run_dir, job_id)}"
            time.sleep(0.2)
    finally:  # let it run on (its own watchdog ends it) rather than wait for the launcher's SIGKILL
        with contextlib.suppress(psutil.NoSuchProcess):
            stopped.send_signal(signal.SIGCONT)
    log = wait_requeued_once_and_completed(slurm, job_id, run_dir)
    assert_in_order(
        log,
        [
            r"error: rank 0: no step boundary after step \d+ \(train.hang_timeout=10\)",
            r"trainer hung \(its watchdog stopped it\); stacks of all threads: .*hang/rank-0.txt",
            rf"requeueing job {job_id} \(hang 1 of at most 1\); the next run resumes from step-\d+",
            rf"job {job_id}, run 2 \(restart count 1\)",
            r"resuming from newest complete checkpoint: step-0*[1-9]\d*$",
            rf"launchers exited with status 0; newest complete checkpoint: step-{steps:08d}",
        ],
    )
    assert RunDir(run_dir).marker("done").exists()
