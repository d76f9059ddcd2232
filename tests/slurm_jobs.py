"""Jobs of cluster/*.sh under tests/slurm_local.py's Slurm: what a user exports, submitting, waiting, and
reading what a job left in its run directory."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil

from dist_vae.run_layout import RunDir
from tests.slurm_local import LocalSlurm

REPO = Path(__file__).resolve().parents[1]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
CPUS = min(2, os.cpu_count() or 1)  # the debug accelerate config starts 2 processes
# Evaluation and sampling are the engine's business; here they would only cost time. Batch 8 per rank fits
# both splits of the 64 demo images. train.compile=auto would compile the train.steps=100000 jobs.
QUIET = (
    "data.batch_size=8 train.eval_every=100000 train.sample_every=100000 train.log_every=5 eval.fid_every=0"
    " train.compile=off"
)


def job_env(base: dict[str, str], shards: Path, run_dir: Path, extra: str, **more: str) -> dict[str, str]:
    """What a user would export; SLURM_* of an enclosing job would make the script think it is one."""
    env = {k: v for k, v in base.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    env.update(
        DATA=str(shards),
        RUN_DIR=str(run_dir),
        CONFIG="configs/debug.yaml",
        ACCEL_CONFIG="configs/accelerate/cpu_debug.yaml",
        NODES="1",
        GPUS_PER_NODE="0",
        PYTHON=sys.executable,
        EXTRA=extra,
        OMP_NUM_THREADS="1",
    )
    env.update(more)
    return env


def complete_checkpoints(run_dir: Path) -> list[int]:
    return sorted(
        int(d.name[5:]) for d in RunDir(run_dir).checkpoints.glob("step-*") if (d / "COMPLETE").exists()
    )


def job_log(run_dir: Path, job_id: str) -> str:
    path = run_dir / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else f"({path} missing)"


def scalar_steps(run_dir: Path) -> set[int]:
    """Steps at which the trainer logged a TensorBoard scalar, over every event file of the run."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = set()
    for path in RunDir(run_dir).tensorboard.rglob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            if event.HasField("summary") and len(event.summary.value):
                steps.add(event.step)
    return steps


def assert_in_order(log: str, patterns: list[str]) -> list[re.Match[str]]:
    """Each regex matches after the previous one; the matches."""
    found, pos = [], 0
    for pattern in patterns:
        match = re.compile(pattern, re.M).search(log, pos)
        assert match, f"job log lacks /{pattern}/ after offset {pos}:\n{log[-6000:]}"
        found.append(match)
        pos = match.end()
    return found


def submit_self(env: dict[str, str], cwd: Path) -> str:
    """Run cluster/lsun_256.sh outside a job (it submits itself with sbatch); the job id."""
    done = subprocess.run(
        [str(REPO / "cluster/lsun_256.sh"), "--parsable", f"--cpus-per-task={CPUS}"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().split(";")[0]


def wait_for_first_checkpoint(slurm: LocalSlurm, job_id: str, run_dir: Path) -> None:
    """Until the trainer is past start-up and has checkpointed once, with the job still alive."""
    deadline = time.monotonic() + 180
    while not complete_checkpoints(run_dir):
        state = slurm.job(job_id)["JobState"]
        assert state in {"PENDING", "RUNNING"}, f"{state} before a checkpoint:\n{job_log(run_dir, job_id)}"
        assert time.monotonic() < deadline, f"no checkpoint after 180 s:\n{job_log(run_dir, job_id)}"
        time.sleep(0.2)


def wait_requeued_once_and_completed(slurm: LocalSlurm, job_id: str, run_dir: Path) -> str:
    """Wait until the job ends after its requeue; assert it completed once requeued; its log."""
    info = slurm.wait_job(
        job_id,
        lambda i: i["JobState"] in FINAL_STATES and (i["Restarts"] != "0" or i["JobState"] != "COMPLETED"),
        300,
    )
    log = job_log(run_dir, job_id)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "1", "0:0"), (
        f"{info}\n{log}"
    )
    return log


def trainer_process(run_dir: Path, rank: int) -> psutil.Process:
    """The trainer process of `rank` in the run (not its launcher, which has no RANK)."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if f"run_dir={run_dir}" in cmdline and "train.py" in cmdline:
            with contextlib.suppress(psutil.Error):
                if proc.environ().get("RANK") == str(rank):
                    return proc
    raise AssertionError(f"no trainer process of rank {rank} for {run_dir}")
