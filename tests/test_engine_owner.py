"""One owner per run directory, and Ctrl-C as a preemption the user asked for.

Two trainers on one run directory: exactly one trains, the other exits 2 naming the holder, and the
run continues bit-exactly afterwards; a lease whose holder was killed with -9 is taken over; a
trainer whose lease was taken over stops without writing more. The first SIGINT to a 2-process run
checkpoints that step and exits 130 without a traceback, and the run resumes bit-exactly; a second
SIGINT during the save exits at once, and the run resumes from the checkpoint before."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dist_vae.checkpoint import complete_checkpoints
from dist_vae.errors import ExitCode
from dist_vae.lease import Lease, LeaseHeld
from dist_vae.run_layout import RunDir
from tests.engine_util import (
    accelerate_cmd,
    assert_same,
    check,
    checkpoint_contents,
    env,
    python_cmd,
    run,
)

QUIET = ["train.eval_every=1000", "train.sample_every=1000", "train.log_every=1000"]


_started: list[subprocess.Popen] = []


def start(cmd: list[str], **extra_env: str) -> subprocess.Popen:
    """A trainer in a session of its own (its group gets the signals a terminal would send)."""
    proc = subprocess.Popen(
        cmd, env=env(**extra_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    _started.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _no_trainer_left() -> Iterator[None]:
    """A failed test leaves no trainer running behind it."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def final(run_dir: Path, step: int) -> dict:
    newest, path = complete_checkpoints(run_dir)[-1]
    assert newest == step
    return checkpoint_contents(path)


def race(cmd: list[str], delay: float) -> None:
    """Start `cmd` twice, `delay` seconds apart: exactly one trains, the other exits 2 naming it. Each
    file a save writes waits 0.8 s, so the winner still holds the lease when the later one starts
    however fast the machine (a winner already done would let the other find the run finished)."""
    first = start(cmd, HARNESS_SAVE_SLEEP="0.8")
    time.sleep(delay)
    second = start(cmd, HARNESS_SAVE_SLEEP="0.8")
    results = [(p.wait(timeout=120), *p.communicate()) for p in (first, second)]
    codes = sorted(code for code, _, _ in results)
    assert codes == [ExitCode.SUCCESS, ExitCode.REFUSED], [err[-2000:] for _, _, err in results]
    refused = next(err for code, _, err in results if code == ExitCode.REFUSED)
    lines = [line for line in refused.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in refused, refused
    winner = next(p for p, (code, _, _) in zip((first, second), results, strict=True) if code == 0)
    assert f"is in use by dist_vae train pid {winner.pid} on " in lines[0], lines[0]
    assert "(lease " in lines[0] and "/.lease.json); wait for it to finish" in lines[0], lines[0]


def test_two_trainers_on_one_run_dir_one_trains_the_other_is_refused(
    demo_shards: Path, tmp_path: Path
) -> None:
    """Started together, 1.5 s and 3 s apart (the later races resume the run, as a requeued job
    does); afterwards the run equals an uninterrupted one bit for bit."""
    reference, run_dir = tmp_path / "reference", tmp_path / "raced"
    constant = "train.schedule=constant"  # the LR does not depend on train.steps, which grows here
    for steps, delay in ((2, 0.0), (4, 1.5), (6, 3.0)):
        race(python_cmd(run_dir, demo_shards, f"train.steps={steps}", constant, *QUIET), delay)
        assert complete_checkpoints(run_dir)[-1][0] == steps
        assert not RunDir(run_dir).lease.exists()  # released at the end
    check(run(python_cmd(reference, demo_shards, "train.steps=6", constant, *QUIET)))
    assert_same(final(reference, 6), final(run_dir, 6))


def test_a_lease_whose_holder_was_killed_is_taken_over(demo_shards: Path, tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dist_vae.lease import Lease; "
         "Lease(sys.argv[1], owner='dist_vae train').acquire(); print('held', flush=True); time.sleep(600)",
         str(RunDir(tmp_path).lease)],
        env=env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    proc = run(python_cmd(tmp_path, demo_shards, "train.steps=1", *QUIET))
    check(proc)
    taken = f"{tmp_path}: taking over the run directory from dist_vae train pid {holder.pid} on "
    assert any(line.startswith(taken) and line.endswith("(gone)") for line in proc.stderr.splitlines())
    assert complete_checkpoints(tmp_path)[-1][0] == 1


def test_a_trainer_whose_lease_was_taken_over_stops_without_writing_more(
    demo_shards: Path, tmp_path: Path
) -> None:
    proc = start(python_cmd(tmp_path, demo_shards, "train.steps=400", "train.checkpoint_every=1", *QUIET))
    while not complete_checkpoints(tmp_path) and proc.poll() is None:
        time.sleep(0.02)
    # Another process judges the trainer gone (a timeout shorter than its heartbeat interval) and
    # takes the lease over, as it would a frozen trainer's after 60 s.
    taker = Lease(RunDir(tmp_path).lease, owner="dist_vae train", timeout=0.2)
    deadline = time.monotonic() + 30
    while True:
        try:
            taker.acquire()
            break
        except LeaseHeld:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
    try:
        newest = complete_checkpoints(tmp_path)[-1][0]
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == ExitCode.REFUSED, err[-3000:]
        assert "another process took this run directory over at step" in err and "Traceback" not in err
        assert complete_checkpoints(tmp_path)[-1][0] <= newest + 1  # at most the save under way
        assert taker.still_held()  # the stopped trainer left the taker's lease alone
    finally:
        taker.release()


STEPS = 12
TWO = ["train.checkpoint_every=1", *QUIET]


@pytest.mark.slow
def test_ctrl_c_to_a_two_process_run_checkpoints_that_step_and_exits_130(
    demo_shards: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """As a terminal does: SIGINT to the launcher and its workers (torchrun forwards it once more)."""
    reference, run_dir = tmp_path_factory.mktemp("ref2"), tmp_path_factory.mktemp("interrupted")
    check(run(accelerate_cmd("cpu_debug.yaml", reference, demo_shards, f"train.steps={STEPS}", *TWO)))
    proc = start(accelerate_cmd("cpu_debug.yaml", run_dir, demo_shards, f"train.steps={STEPS}", *TWO))
    deadline = time.monotonic() + 120
    while not complete_checkpoints(run_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random().uniform(0.0, 0.3))
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.INTERRUPTED, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    step = complete_checkpoints(run_dir)[-1][0]
    assert 0 < step < STEPS
    stopped = f"stopped by SIGINT at step {step}; checkpoint {RunDir(run_dir).checkpoint(step)}; run the"
    assert sum(line.startswith(stopped) for line in err.splitlines()) == 1, err[-3000:]
    assert not RunDir(run_dir).marker("requeue").exists()  # a user's stop is not requeued
    check(run(accelerate_cmd("cpu_debug.yaml", run_dir, demo_shards, f"train.steps={STEPS}", *TWO)))
    assert_same(final(reference, STEPS), final(run_dir, STEPS))


def test_a_second_ctrl_c_during_the_save_exits_at_once(demo_shards: Path, tmp_path: Path) -> None:
    def cmd(steps: int) -> list[str]:
        return python_cmd(tmp_path, demo_shards, f"train.steps={steps}", "train.checkpoint_every=2", *QUIET)

    proc = start(cmd(400), HARNESS_SAVE_SLEEP="0.3")  # ~2 s per save
    while not complete_checkpoints(tmp_path) and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    first = time.monotonic()
    time.sleep(1.1)  # past the echo window of the first
    checkpoints = RunDir(tmp_path).checkpoints
    while not any(p.name.startswith(".tmp-step-") for p in checkpoints.iterdir()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    previous = complete_checkpoints(tmp_path)[-1][0]
    assert time.monotonic() - first > 1.0
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.INTERRUPTED, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted again"), err
    assert complete_checkpoints(tmp_path)[-1][0] == previous  # the save it cut short left a temporary
    assert any(p.name.startswith(".tmp-step-") for p in checkpoints.iterdir())
    resumed = run(cmd(previous + 1))
    check(resumed)
    assert f"resumed from step {previous} (" in resumed.stderr, resumed.stderr[-3000:]
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".tmp")]
