"""Runs dist_vae/train.py with test hooks installed through torch's global module hooks.

The engine has no test switches; this script (run directly or under `accelerate launch`) attaches
real forward hooks to whatever model `build_model` returns, driven by environment variables:
  HARNESS_NAN_AT=3,5   multiply the training loss of those training forward calls (0-based) by NaN
  HARNESS_SPIKE_AT=4   multiply the training loss of those calls by 1000 (a gradient-norm spike)
  HARNESS_OVERFLOW_AT=5  multiply the training loss by 1e20 in the forwards of those steps (the
                       model's `step` argument, so a resumed run injects at the same update): finite
                       in fp32, it overflows a loss-scaled fp16 backward
  HARNESS_RECORD=DIR   append a checksum of every training input batch to DIR/rank-<RANK>.txt
  HARNESS_SAVE_SLEEP=0.5  sleep that many seconds before each file a checkpoint save writes (a save
                       slow enough to be interrupted in the middle)
  HARNESS_BLIND_RANK=1  that rank finds no checkpoint to resume (a node whose listing of the shared
                       file system is stale)
  HARNESS_SLEEP_AT=1:4:600  rank 1 sleeps 600 s in `sleep_inside_step` before its training forward
                       call 4 (0-based): a hang inside a step, while the other ranks wait in its collective
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook  # noqa: E402

from dist_vae import train  # noqa: E402
from dist_vae.models.output import LossOutput  # noqa: E402

NAN_AT = {int(i) for i in os.environ.get("HARNESS_NAN_AT", "").split(",") if i}
SPIKE_AT = {int(i) for i in os.environ.get("HARNESS_SPIKE_AT", "").split(",") if i}
OVERFLOW_AT = {int(i) for i in os.environ.get("HARNESS_OVERFLOW_AT", "").split(",") if i}
RECORD = os.environ.get("HARNESS_RECORD")
SLEEP_RANK, SLEEP_AT, SLEEP_S = (int(v) for v in os.environ.get("HARNESS_SLEEP_AT", "-1:-1:0").split(":"))
calls = {"n": 0}


def _is_top_model(module: torch.nn.Module) -> bool:
    return module.training and type(module).__name__ in ("PixelVAE", "IterativeVAE")


def record_inputs(module: torch.nn.Module, args: tuple) -> None:
    if RECORD and _is_top_model(module):
        rank = os.environ.get("RANK", "0")
        with open(Path(RECORD) / f"rank-{rank}.txt", "a") as f:
            f.write(f"{float(args[0].double().sum()):.6f}\n")
    if calls["n"] == SLEEP_AT and int(os.environ.get("RANK", "0")) == SLEEP_RANK and _is_top_model(module):
        sleep_inside_step()


def sleep_inside_step() -> None:
    """The frame a hang test looks for in the stack file."""
    time.sleep(SLEEP_S)


def inject_bad_loss(module: torch.nn.Module, _args: tuple, output: object) -> object:
    if not (isinstance(output, LossOutput) and _is_top_model(module)):
        return None
    index = calls["n"]
    calls["n"] += 1
    factor = float("nan") if index in NAN_AT else 1000.0 if index in SPIKE_AT else None
    if factor is None:
        return None
    return dataclasses.replace(output, loss=output.loss * factor)


def inject_overflow(module: torch.nn.Module, _args: tuple, kwargs: dict, output: object) -> object:
    if not (isinstance(output, LossOutput) and _is_top_model(module) and kwargs.get("step") in OVERFLOW_AT):
        return None
    return LossOutput(output.loss * 1e20, output.scalars, output.aux_losses)


def slow_saves(seconds: float) -> None:
    from dist_vae.checkpoint import store

    write = store.write_synced

    def slow_write(path: Path, data: bytes) -> None:
        time.sleep(seconds)
        write(path, data)

    store.write_synced = slow_write


def blind_rank() -> None:
    from dist_vae import checkpoint

    checkpoint.resolve_resume = lambda resume, run_dir: None


if os.environ.get("HARNESS_BLIND_RANK") == os.environ.get("RANK", "0"):
    blind_rank()
if os.environ.get("HARNESS_SAVE_SLEEP"):
    slow_saves(float(os.environ["HARNESS_SAVE_SLEEP"]))
register_module_forward_pre_hook(record_inputs)
register_module_forward_hook(inject_bad_loss)
register_module_forward_hook(inject_overflow, with_kwargs=True)
sys.exit(train.main(sys.argv[1:]))
