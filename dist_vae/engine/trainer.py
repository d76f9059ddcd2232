"""The training loop: one Accelerator drives DDP or DeepSpeed (chosen by the accelerate config file).

The Trainer composes parts with one job each, built in this order by `Trainer._assemble`:
  checkpointing.py  the checkpoint this run resumes and the batch it resumes with (train.resize), the
                    run directory claimed, config.yaml, save/restore, the marker a stopped run leaves
  backend.py        Accelerator, model, optimizer, EMA, the compile rule and the update path (update.py)
  feeds.py          the train and val ShardStreams, the bad-data counts, and every rank stopping
                    together when the object store stays unreachable (exit 6)
  step.py           one update: LR schedule, random streams, micro-batches, the skip decision
  monitor.py        progress bar, TensorBoard, the log-point scalars and the code's health
  periodic.py       when to log, evaluate, sample and save, and the evaluations themselves
  stops.py          the run directory's owner (its lease), preemption signals and Ctrl-C, the
                    hang watchdog (exit 5) and the run's markers
so that `fit` below is the loop and nothing else.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from dist_vae.config import Config
from dist_vae.data.storage import StoreUnreachable
from dist_vae.engine.backend import build_backend
from dist_vae.engine.checkpointing import (
    Checkpointer,
    ConfigChange,
    check_resume,
    claim_run_dir,
    launched_world_size,
    resized_config,
    resume_path,
)
from dist_vae.engine.feeds import PeerUnreachable, Streams, check_data, static_batches
from dist_vae.engine.monitor import CodeHealth, RunLogger, ScalarLog, Window
from dist_vae.engine.periodic import Cadence, Evaluation, periodic_actions
from dist_vae.engine.step import UpdateStep, make_gate
from dist_vae.engine.stops import (
    INTERRUPT,
    LEASE_LOST,
    PreemptionFlag,
    RunOwner,
    Watchdog,
    store_unreachable_line,
)
from dist_vae.errors import ConfigError, DistVaeError, ExitCode
from dist_vae.metrics.during_training import check_fid_ready
from dist_vae.run_layout import RunDir
from dist_vae.trackers import check_trackers


class Trainer:
    def __init__(
        self,
        cfg: Config,
        preemption: PreemptionFlag | None = None,
        *,
        before_step: Callable[[int], None] | None = None,
    ) -> None:
        """`preemption`: a flag the caller installed even earlier (train.py, before its imports);
        otherwise the handlers go in first thing here, so a signal during start-up is not lost.
        `before_step(step)`: called at the top of every loop iteration, before the update that makes
        step + 1 (benchmarks time the engine with it)."""
        self.preemption = preemption or PreemptionFlag().install()
        self.before_step = before_step
        # Rank 0 (torchrun's RANK: the process group does not exist yet) owns the run directory before
        # anything in it is read or changed; every rank learns the outcome in claim_run_dir.
        self.owner = RunOwner(RunDir(cfg.run_dir), int(os.environ.get("RANK", "0")))
        try:
            self._claim(cfg)
            self._assemble(cfg)
        except BaseException:
            self.owner.release()
            self.preemption.restore()
            raise

    def _claim(self, cfg: Config) -> None:
        taken = self.owner.claim()
        if taken:
            print(taken, file=sys.stderr)
        if self.owner.refused is not None and launched_world_size() == 1:
            raise ConfigError(self.owner.refused)  # alone: refused at once, nothing read
        self.preemption.owner = self.owner

    def _assemble(self, cfg: Config) -> None:
        try:
            self._build(cfg)
        except DistVaeError:
            if self.owner.refused is not None:  # what rank 0 saw while refused is not the news
                raise ConfigError(self.owner.refused) from None
            raise

    def _build(self, cfg: Config) -> None:
        resume_from = resume_path(cfg)
        check_trackers(cfg.log)  # a missing wandb or mlflow: exit 2 now, before any step
        check_data(cfg.data)
        if cfg.eval.fid_every:  # no [metrics] extra or Inception file: exit 2 now, not at the first FID
            check_fid_ready(cfg.eval, cfg.data)
        # Another world size than the checkpoint's: train.resize settles the batch before DeepSpeed reads it.
        cfg, self.resize = resized_config(cfg, cfg.data.batch_size, resume_from, launched_world_size())
        change = check_resume(cfg, resume_from, self.resize.step)
        self.cfg, self.run = cfg, RunDir(cfg.run_dir)
        self.backend = build_backend(cfg, self.resize.world[1], self.resize.lr_scale)
        self.accelerator = self.backend.accelerator
        claim_run_dir(self.accelerator, cfg, change, self.owner.refused)
        self.gate = make_gate(cfg.train, self.accelerator.device)
        self.streams = Streams(cfg.data, cfg.seed, self.accelerator)
        pending = change if change.changes else None  # config.yaml waits for this run's first save
        self.checkpoints = Checkpointer(
            cfg, self.backend, self.streams, self.gate, self.resize.reference_global_batch, pending
        )
        self.step = self.checkpoints.restore(resume_from) if resume_from is not None else 0
        if self.accelerator.is_main_process:
            self._announce(resume_from, change)
        main = self.accelerator.is_main_process
        self.logger = RunLogger(self.run, cfg.train.steps, self.step, main, cfg.log, cfg)
        self.logger.scalars(self.resize.scalars(), self.step)
        self.update_step = UpdateStep(cfg.train, cfg.seed, self.backend, self.gate, self.preemption)
        health = CodeHealth(cfg.health, self.logger)
        self.scalar_log = ScalarLog(self.backend, self.gate, self.streams, self.logger, health)
        evaluation = Evaluation(cfg, self.backend, self.streams, self.logger)
        self.cadence = Cadence(cfg.train, periodic_actions(cfg, evaluation, self.streams.validate))
        rank, t = self.accelerator.process_index, cfg.train
        self.watchdog = Watchdog(self.run, rank, t.hang_timeout, t.action_timeout)

    def _announce(self, resume_from: Path | None, change: ConfigChange) -> None:
        """Rank 0's lines before training: where it resumed, how a resize changed the batch, each
        changed key, and that a finished run has nothing left to train."""
        lines = [f"resumed from step {self.step} ({resume_from})"] if resume_from is not None else []
        lines += [self.resize.line(), *change.lines()]
        if self.step >= self.cfg.train.steps:
            lines.append(
                f"run already finished: step {self.step} of train.steps={self.cfg.train.steps}, nothing "
                "to train; config.yaml is unchanged (raise train.steps to train on)"
            )
        for line in filter(None, lines):
            print(line, file=sys.stderr)

    def fit(self) -> ExitCode:
        """Train to train.steps (SUCCESS), until preempted (REQUEUE) or interrupted (INTERRUPTED), until
        the run directory's lease is lost (REFUSED), or until the object store stays unreachable
        (STORE_UNREACHABLE, after a checkpoint); raises TrainingDiverged after
        train.max_nonfinite_skips non-finite updates in a row. A hang ends the process from the
        watchdog's thread (HANG)."""
        try:
            with self.watchdog.watching(self.step):
                stop = self.update_step.stop_vote()
                if stop:  # signalled during start-up: nothing new to save
                    return self._stop(stop)
                batches, window = static_batches(self.streams.train_batches()), Window()
                try:
                    while self.step < self.cfg.train.steps:
                        if self.before_step is not None:
                            self.before_step(self.step)
                        with self.streams.whole_step():
                            self.update_step(self.step, batches, window)
                        self.step += 1
                        # The device is read only here: a divergence or (several processes) a signal
                        # or a lost lease is noticed at the next log, evaluation or checkpoint step,
                        # before anything is saved.
                        reads = self.cadence.reads_due(self.step)
                        diverged = reads and self.gate.diverged
                        stop = self.update_step.stop_vote(reads)
                        if stop == LEASE_LOST:
                            return self._stop(stop)
                        if self.cadence.log_due(self.step, diverged):
                            self.logger.progress(self.step, self.scalar_log.write(window, self.step))
                            window = Window()
                        else:
                            self.logger.progress(self.step, None)
                        if diverged:  # every rank decided the same: all stop here, saving nothing
                            raise self.checkpoints.diverged(self.step)
                        with window.pause(), self.watchdog.between_steps(self.step):
                            self.cadence.run_actions(self.step)
                            if self.cadence.save_due(self.step, bool(stop)):
                                self.checkpoints.save(self.step)
                        if stop:
                            return self._stop(stop)
                except StoreUnreachable as exc:  # on every rank at the same point (feeds.py)
                    return self._unreachable(exc)
                self.checkpoints.done(self.step)
                return ExitCode.SUCCESS
        finally:
            self.preemption.restore()
            self.logger.close()
            self.accelerator.end_training()
            self.owner.release()

    def _stop(self, stop: int) -> ExitCode:
        """Every rank agreed on `stop` at this step boundary: a Ctrl-C (exit 130) or a preemption
        (exit 3) after the checkpoint; a lost lease without writing anything (exit 2)."""
        if stop == LEASE_LOST:
            if self.accelerator.is_main_process:
                print(f"error: {self.owner.taken_line(self.step)}", file=sys.stderr)
            return ExitCode.REFUSED
        return self.checkpoints.requeue(self.step, self.preemption.signal_name, stop == INTERRUPT)

    def _unreachable(self, error: StoreUnreachable) -> ExitCode:
        """The object store failed past its retries: checkpoint the last completed step (unless saved
        already), leave the requeue marker with reason UNREACHABLE, exit 6. Every rank is here."""
        acc, step = self.accelerator, self.step
        with self.watchdog.between_steps(step):
            if step > self.checkpoints.saved:
                self.checkpoints.save(step)
        if acc.is_main_process:
            saved = f"checkpoint {self.run.checkpoint(step)}" if step else "nothing trained yet"
            progress = f"stopped at step {step} ({saved})"
            self.logger.line(store_unreachable_line(self.run, step, error, progress))
        elif not isinstance(error, PeerUnreachable):  # rank 0 names only its own or a peer's failure
            print(f"error: rank {acc.process_index}: {error}", file=sys.stderr)
        acc.wait_for_everyone()  # no rank exits before the marker exists (see Checkpointer.requeue)
        return ExitCode.STORE_UNREACHABLE
