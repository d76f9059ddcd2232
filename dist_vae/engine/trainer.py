"""The training loop: one Accelerator drives DDP or DeepSpeed (chosen by the accelerate config file).

The Trainer composes parts with one job each, built in this order by `Trainer._assemble`:
  checkpointing.py  the checkpoint this run resumes, the run directory claimed, save/restore, markers
  resize.py         the batch and learning rates a resume on another world size uses
  backend.py        Accelerator, model, optimizer, EMA and the update path (update.py)
  streams.py        the train and val ShardStreams and the bad-data counts
  step.py           one update: micro-batches, the skip decision, apply or discard
  window.py         the running sums between log points and the scalars a log point writes
  health.py         whether the code is in use (health/* scalars) and the posterior-collapse warning
  cadence.py        when to log, evaluate, sample (evaluation.py) and save
  watchdog.py       stacks and exit code 5 when a step, or the work between two, takes too long
  compile_choice.py train.compile=auto on the CPU: time the first updates, compile if the rest pays
so that `fit` below is the loop and nothing else.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from dist_vae.config import Config
from dist_vae.engine.backend import build_backend, start_accelerator
from dist_vae.engine.cadence import Cadence, periodic_actions
from dist_vae.engine.checkpointing import Checkpointer, claim_run_dir, resume_path
from dist_vae.engine.compile_choice import AutoCompile
from dist_vae.engine.evaluation import Evaluation
from dist_vae.engine.health import CodeHealth
from dist_vae.engine.logging import RunLogger
from dist_vae.engine.preemption import PreemptionFlag
from dist_vae.engine.resize import launched_world_size, resized_config
from dist_vae.engine.run_config import ConfigChange
from dist_vae.engine.step import UpdateStep, make_gate
from dist_vae.engine.streams import Streams, check_data
from dist_vae.engine.watchdog import Watchdog
from dist_vae.engine.window import ScalarLog, Window
from dist_vae.metrics.during_training import check_fid_ready


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
        try:
            self._assemble(cfg)
        except BaseException:
            self.preemption.restore()
            raise

    def _assemble(self, cfg: Config) -> None:
        resume_from = resume_path(cfg)
        check_data(cfg)
        if cfg.eval.fid_every:
            check_fid_ready(cfg)  # no [metrics] extra or Inception file: exit 2 now, not at the first FID
        # Another world size than the checkpoint's: train.resize settles the batch before DeepSpeed reads it.
        cfg, self.resize = resized_config(cfg, cfg.data.batch_size, resume_from, launched_world_size())
        self.cfg = cfg
        self.accelerator = start_accelerator(cfg, self.resize.world[1])
        change = claim_run_dir(self.accelerator, cfg, resume_from, self.resize.step)
        self.backend = build_backend(cfg, self.accelerator, self.resize.lr_scale)
        self.gate = make_gate(cfg)
        self.streams = Streams(cfg, self.accelerator)
        self.checkpoints = Checkpointer(cfg, self.resize, self.backend, self.streams, self.gate, change)
        self.step = self.checkpoints.restore(resume_from) if resume_from is not None else 0
        if self.accelerator.is_main_process:
            self._announce(resume_from, change)
        self.logger = self._start_logger()
        self.update_step = UpdateStep(cfg, self.backend, self.gate, self.preemption)
        health = CodeHealth(cfg.health, self.logger)
        self.scalar_log = ScalarLog(self.backend, self.gate, self.streams, self.logger, health)
        evaluation = Evaluation(cfg, self.backend, self.streams, self.logger)
        self.cadence = Cadence(cfg, periodic_actions(cfg, evaluation, self.streams.validate))
        rank, t = self.accelerator.process_index, cfg.train
        self.watchdog = Watchdog(Path(cfg.run_dir), rank, t.hang_timeout, t.action_timeout)
        self.auto_compile = AutoCompile(cfg, self.backend, self.step, self.watchdog)

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

    def _start_logger(self) -> RunLogger:
        """Rank 0's logger (its progress bar only when there are steps to take)."""
        main = self.accelerator.is_main_process
        logger = RunLogger(Path(self.cfg.run_dir), self.cfg.train.steps, self.step, enabled=main)
        logger.scalars(self.resize.scalars(), self.step)
        return logger

    def fit(self) -> int:
        """Train to train.steps (exit code 0) or until preempted (REQUEUE_EXIT_CODE); raises
        TrainingDiverged after train.max_nonfinite_skips non-finite updates in a row. A hang ends the
        process from the watchdog's thread (HANG_EXIT_CODE)."""
        try:
            with self.watchdog.watching(self.step):
                if self.update_step.preempted():  # signalled during start-up: nothing new to save
                    return self.checkpoints.requeue(self.step, self.preemption.signal_name)
                batches, window = iter(self.streams.train), Window()
                while self.step < self.cfg.train.steps:
                    if self.before_step is not None:
                        self.before_step(self.step)
                    with self.auto_compile.timed(self.step):
                        update = self.update_step(self.step, batches, window)
                    self.step += 1
                    if self.cadence.log_due(self.step, self.gate.diverged):
                        self.logger.progress(self.step, self.scalar_log.write(window, self.step))
                        window = Window()
                    else:
                        self.logger.progress(self.step, None)
                    if self.gate.diverged:  # every rank decided the same: all stop here, saving nothing
                        raise self.checkpoints.diverged(self.step)
                    with window.pause(), self.watchdog.between_steps(self.step):
                        self.auto_compile.settle(self.step)
                        self.cadence.run_actions(self.step)
                        if self.cadence.save_due(self.step, update.preempted):
                            self.checkpoints.save(self.step)
                    if update.preempted:
                        return self.checkpoints.requeue(self.step, self.preemption.signal_name)
                self.checkpoints.done(self.step)
                return 0
        finally:
            self.preemption.restore()
            self.logger.close()
            self.accelerator.end_training()
