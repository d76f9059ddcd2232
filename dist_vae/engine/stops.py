"""How a run stops other than by finishing: preemption signals, the hang watchdog, and the markers a
stopped run leaves for the cluster script (cluster/launch.sh).

Preemption: SIGUSR1 and SIGTERM only set a flag; the trainer reads it at the next step boundary,
agrees on it across ranks (one all-reduce, so no rank leaves a collective behind), checkpoints and exits
with `ExitCode.REQUEUE`. Because `accelerate launch`/torchrun may replace a worker's exit code by its
own, the trainer also writes the `requeue` marker, which the cluster script can test instead.

Ctrl-C is a preemption the user asked for: the first SIGINT is handled like SIGTERM (checkpoint at
the next step boundary, the same one-line stop message) but exits with `ExitCode.INTERRUPTED` (130)
and leaves no `requeue` marker (a stale `requeue` or `done` is removed): nobody should requeue a run
its user stopped. A SIGINT within `SIGINT_ECHO_S` of the first is the same Ctrl-C (a terminal sends it
to the launcher and its workers, and torchrun forwards it once more); a later one exits at once with
one line and no traceback, leaving the newest complete checkpoint to resume from (a save it cut short
is a temporary that the next start removes).

Ownership: rank 0 holds the run directory's lease (`RunOwner`, dist_vae/lease.py, RunDir.lease) from
before it reads or changes anything until the run ends; a second trainer is refused naming the
holder, a gone holder's lease is taken over with one line, and a trainer whose lease another took
over (it looked gone) stops at its next step boundary without writing more (exit 2).

Hangs: a daemon thread waits on a monotonic deadline that the trainer moves forward at each step
boundary (`between_steps`), so a rank stuck in C code (a collective, a sleep, a DataLoader wait) is
still caught. On expiry the rank writes the stacks of all its threads (faulthandler) to
`RUN_DIR/hang/rank-R.txt`, prints one line and leaves with `ExitCode.HANG` through `os._exit` (the
main thread cannot be asked to unwind); a save it cuts short is a temporary that the next start
removes, and DataLoader workers die with it (PR_SET_PDEATHSIG, data/workers.py). Every rank's
watchdog fires on its own, within moments of the others' (the step's all-reduce aligns the
boundaries); each waits `GRACE_S` after its dump so that no peer's collective fails (and unwinds its
stack) before that peer has dumped too.

Bounds: a step gets `train.hang_timeout` seconds or, unset, the larger of `MIN_STEP_TIMEOUT_S` and
`MEDIAN_FACTOR` times the median of the recent step times (15 minutes until steps have been timed).
Evaluation, sampling and checkpoint saving run between steps and may rightly take longer: while
they run (`between_steps`) the bound is `train.action_timeout` instead.

Only the standard library (and the stdlib-only errors.py, run_layout.py) is imported here, so train.py
installs the signal handlers before torch loads (seconds in which a signal would kill the process).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from types import FrameType

from dist_vae.errors import ExitCode
from dist_vae.lease import Lease, LeaseHeld
from dist_vae.run_layout import RunDir

HANDLED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
SIGINT_ECHO_S = 1.0  # a second SIGINT sooner than this is the same Ctrl-C, forwarded by the launcher
# What a rank votes at a step boundary (every rank takes the maximum): a cluster's preemption wins
# over a Ctrl-C (the run should be requeued), and a lost lease over both (nothing may be written).
GO_ON, INTERRUPT, PREEMPT, LEASE_LOST = 0, 1, 2, 3
MIN_STEP_TIMEOUT_S = 900.0
MEDIAN_FACTOR = 50
TIMED_STEPS = 100  # the median is over this many recent steps
GRACE_S = 5.0
UNREACHABLE = "store-unreachable"  # the requeue marker's reason after exit 6: launch.sh waits, then requeues


class PreemptionFlag:
    """Remembers that a handled signal arrived; installing replaces the previous handlers until `restore`.

    `owner`: the run directory's lease, once held (its loss is voted with the signals, and a second
    Ctrl-C releases it before exiting)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.owner: RunOwner | None = None
        self._interrupted_at: float | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionFlag:
        for sig in HANDLED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def vote(self) -> int:
        """This rank's GO_ON, INTERRUPT, PREEMPT or LEASE_LOST (rank 0 reads its lease file)."""
        if self.owner is not None and self.owner.lost():
            return LEASE_LOST
        if self.signal_name is None:
            return GO_ON
        return INTERRUPT if self.signal_name == "SIGINT" else PREEMPT

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if signum != signal.SIGINT:
            self.signal_name = signal.Signals(signum).name  # a preemption outranks a Ctrl-C
            return
        now = time.monotonic()
        if self._interrupted_at is None:
            self._interrupted_at = now
            self.signal_name = self.signal_name or "SIGINT"
        elif now - self._interrupted_at >= SIGINT_ECHO_S:
            print(  # on a line of its own, not after an open progress bar
                "\ninterrupted again (second Ctrl-C): exiting now without saving; run the same command "
                "to resume from the newest complete checkpoint",
                file=sys.stderr,
                flush=True,
            )
            if self.owner is not None:
                self.owner.release()
            os._exit(ExitCode.INTERRUPTED)


class RunOwner:
    """Rank 0's lease on the run directory; other ranks hold nothing (`lease` None)."""

    def __init__(self, run: RunDir, rank: int) -> None:
        self.run = run
        self.lease = Lease(run.lease, owner="dist_vae train") if rank == 0 else None
        self.refused: str | None = None  # rank 0: the holder that refused this run, in one line
        self.held = False

    def claim(self) -> str | None:
        """Take the lease (rank 0); the line saying a gone holder's was taken over, or None. A live
        holder leaves `refused` set instead."""
        if self.lease is None:
            return None
        try:
            self.lease.acquire()
        except LeaseHeld as exc:
            self.refused = f"{exc}; two trainers on one run_dir are refused"
            return None
        except OSError as exc:  # read-only or full file system: exit 2, like any write to run_dir
            self.refused = f"run_dir {self.run.root} is not writable: {exc.strerror} ({exc.filename})"
            return None
        self.held = True
        taken = self.lease.taken_over
        return f"{self.run.root}: taking over the run directory from {taken} (gone)" if taken else None

    def lost(self) -> bool:
        """Whether another process took the lease over (one small read of the lease file)."""
        return self.held and self.lease is not None and not self.lease.still_held()

    def taken_line(self, step: int) -> str:
        return (
            f"{self.run.root}: another process took this run directory over at step {step} (this trainer "
            f"looked gone: no heartbeat for {self.lease.timeout if self.lease else 0:.0f} s); stopped "
            "without writing more so that two do not train it"
        )

    def release(self) -> None:
        if self.held and self.lease is not None:
            self.lease.release()
            self.held = False


def write_marker(run: RunDir, name: str, lines: str, stale: tuple[str, ...]) -> None:
    """Leave marker `name` with `lines` (and the time) after removing the `stale` ones."""
    # files.py imports torch: loaded here, not at import (see the module docstring).
    from dist_vae.files import write_text_atomic

    for old in stale:
        run.marker(old).unlink(missing_ok=True)
    write_text_atomic(run.marker(name), f"{lines}time {time.time():.0f}\n")


def write_requeue_marker(run: RunDir, step: int, reason: str) -> None:
    """Tell the cluster script that the run stopped early and wants to be requeued (a `done` left by
    an earlier, shorter train.steps would tell it otherwise)."""
    write_marker(run, "requeue", f"step {step}\nreason {reason}\n", stale=("done", "diverged"))


def store_unreachable_line(run: RunDir, step: int, error: Exception, progress: str) -> str:
    """Leave the requeue marker and return the line of exit 6; `progress` says what was kept."""
    write_requeue_marker(run, step, UNREACHABLE)
    return (
        f"error: {error}; {progress}; exit {int(ExitCode.STORE_UNREACHABLE)}: run the same command again "
        "once the store answers (cluster/launch.sh requeues the job after STORE_RETRY_DELAY seconds)"
    )


def write_done_marker(run: RunDir, step: int) -> None:
    """Tell the cluster script (and a later `resume=auto`) that the run reached train.steps."""
    write_marker(run, "done", f"step {step}\n", stale=("requeue", "diverged"))


def write_stop_marker(run: RunDir, step: int, reason: str, interrupted: bool) -> None:
    """A preempted run leaves the requeue marker; an interrupted one (Ctrl-C) leaves none, and removes
    a `requeue` or `done` that no longer says how the run ended."""
    if not interrupted:
        write_requeue_marker(run, step, reason)
        return
    for name in ("requeue", "done"):
        run.marker(name).unlink(missing_ok=True)


def write_diverged_marker(run: RunDir, step: int, why: str) -> None:
    """Tell the cluster script that the run diverged: requeueing would only repeat it."""
    write_marker(run, "diverged", f"step {step}\nreason {why}\n", stale=("requeue",))


class Watchdog:
    """`with watchdog.watching(step):` around the loop, `with watchdog.between_steps(step):` around
    the work at each step boundary."""

    def __init__(self, run: RunDir, rank: int, hang_timeout: float | None, action_timeout: float) -> None:
        self.rank, self.path = rank, run.hang_stacks(rank)
        self.hang_timeout, self.action_timeout = hang_timeout, action_timeout
        self.fired = threading.Event()
        self._stopped = False
        self._changed = threading.Condition()
        self._durations: deque[float] = deque(maxlen=TIMED_STEPS)
        self._started = self._deadline = time.monotonic()
        self._what = ""  # what the current deadline bounds, for the message

    def step_timeout(self) -> float:
        if self.hang_timeout is not None:
            return self.hang_timeout
        median = statistics.median(self._durations) if self._durations else 0.0
        return max(MIN_STEP_TIMEOUT_S, MEDIAN_FACTOR * median)

    @contextlib.contextmanager
    def watching(self, step: int) -> Iterator[None]:
        """Watch from `step` on. An exception that reaches here after the watchdog fired (a peer left a
        collective) waits for the exit the watchdog is about to make, so the exit code stays the hang's."""
        self._next_step(step)
        thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        thread.start()
        try:
            yield
        except BaseException:
            if self.fired.is_set():
                threading.Event().wait()
            raise
        finally:
            with self._changed:
                self._stopped = True
                self._changed.notify()

    @contextlib.contextmanager
    def between_steps(self, step: int) -> Iterator[None]:
        """The step boundary after update `step`: evaluation, sampling and checkpoint saving run inside,
        bounded by train.action_timeout, and their time is not counted as step time."""
        now = time.monotonic()
        self._durations.append(now - self._started)
        key = f"train.action_timeout={self.action_timeout:g}"
        self._what = f"evaluation, sampling or saving at step {step} unfinished ({key})"
        self._set_deadline(now, self.action_timeout)
        yield
        self._next_step(step)

    def _next_step(self, step: int) -> None:
        """Update `step + 1` begins: it has `step_timeout()` seconds to reach its boundary."""
        if self.hang_timeout is not None:
            key = f"train.hang_timeout={self.hang_timeout:g}"
        else:
            key = (
                f"train.hang_timeout unset: max({MIN_STEP_TIMEOUT_S:g} s, {MEDIAN_FACTOR} x median step time)"
            )
        self._what = f"no step boundary after step {step} ({key})"
        self._set_deadline(time.monotonic(), self.step_timeout())

    def _set_deadline(self, now: float, timeout: float) -> None:
        with self._changed:  # wake the watcher: the new deadline may be earlier than the one it waits for
            self._started, self._deadline = now, now + timeout
            self._changed.notify()

    def _watch(self) -> None:
        with self._changed:
            while not self._stopped:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    self._fire()
                self._changed.wait(left)

    def _fire(self) -> None:
        self.fired.set()
        what = f"rank {self.rank}: {self._what} for {time.monotonic() - self._started:.0f} s"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w") as f:
            f.write(f"{what}; pid {os.getpid()}; time {time.time():.0f}\n\n")
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
            f.flush()
            os.fsync(f.fileno())
        print(
            f"error: {what}; stacks of all threads in {self.path}; "
            f"exit {int(ExitCode.HANG)}: run the same command again to resume from the newest checkpoint",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(GRACE_S)
        os._exit(ExitCode.HANG)
