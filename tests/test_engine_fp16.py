"""fp16 on the CPU: the trainer's own GradScaler, on 1 and then 2 gloo processes. An
overflowing update is skipped (weights, moments and EMA as they were), halves the scale, is counted
apart from the non-finite updates that stop a run, and the scale grows back after the growth interval;
the scaler's state continues through the resume on another number of processes. fp16 under DeepSpeed
is refused, a resume included. The kill -9 bit-exact fp16 case is test_engine_resume.py's, parametrized."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_vae.checkpoint import (
    EMA_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    complete_checkpoints,
    restore_scaler,
    scaler_state,
)
from dist_vae.config import ConfigError, load_config
from dist_vae.engine.backend import DEEPSPEED_FP16, make_accelerator
from dist_vae.run_layout import RunDir
from tests.engine_util import accelerate_cmd, assert_same, check, checkpoint_contents, python_cmd, run

STEPS, SWITCH, INTERVAL = 8, 5, 2  # steps 1-5 on one process, 6-8 resumed on two
OVERFLOWS = (3, 6)  # these updates get a 1e20 loss: finite, but their fp16 backward overflows
# max_nonfinite_skips=1: a counted overflow (the first updates overflow at the initial scale 65536 by
# themselves) would stop the run with exit 4.
FP16 = ["train.precision=fp16", f"train.loss_scale_growth_interval={INTERVAL}", "train.max_nonfinite_skips=1",
        "train.checkpoint_every=1", "train.keep_checkpoints=20", "train.log_every=1", "train.eval_every=100",
        "train.sample_every=100"]  # fmt: skip
INJECT = {"HARNESS_OVERFLOW_AT": ",".join(str(step - 1) for step in OVERFLOWS)}  # the model's step argument


def states(run_dir: Path) -> dict[int, dict]:
    return {step: json.loads((path / STATE_FILE).read_text()) for step, path in complete_checkpoints(run_dir)}


def assert_scaler_rule(found: dict[int, dict]) -> None:
    """From a fresh scaler (65536, tracker 0), every step's saved scale and growth tracker follow from
    the step before: halved and reset on an overflow, doubled after INTERVAL clean updates."""
    scale, tracker, overflows = 65536.0, 0, 0
    for step in range(1, STEPS + 1):
        saved, skipped = found[step]["scaler"], found[step]["meta"]["skipped"]
        overflowed = skipped["overflow"] - overflows
        assert overflowed in (0, 1) and skipped["nonfinite"] == 0, (step, skipped)
        if overflowed:
            scale, tracker = scale / 2, 0
        else:
            tracker += 1
            scale, tracker = (scale * 2, 0) if tracker == INTERVAL else (scale, tracker)
        assert (saved["scale"], saved["_growth_tracker"]) == (scale, tracker), (step, saved)
        overflows = skipped["overflow"]


def assert_overflow_skipped(run_dir: Path, found: dict[int, dict], step: int) -> None:
    """The overflow injected at `step`: counted once, the update not applied, the scale halved and,
    after INTERVAL clean updates, doubled again; the next update is applied."""
    before, at = found[step - 1], found[step]
    assert at["meta"]["skipped"]["overflow"] == before["meta"]["skipped"]["overflow"] + 1
    assert at["scaler"]["scale"] == before["scaler"]["scale"] / 2
    assert found[step + INTERVAL]["scaler"]["scale"] == at["scaler"]["scale"] * 2
    ckpt = {
        s: checkpoint_contents(path) for s, path in complete_checkpoints(run_dir) if step - 1 <= s <= step + 1
    }
    for file in (MODEL_FILE, OPTIMIZER_FILE, EMA_FILE):
        assert_same(ckpt[step - 1][file], ckpt[step][file], file)
    changed = ckpt[step + 1][MODEL_FILE]
    assert any(not torch.equal(w, changed[k]) for k, w in ckpt[step][MODEL_FILE].items())
    assert all(torch.isfinite(w).all() for w in changed.values())


@pytest.mark.slow
def test_overflows_are_skipped_on_one_and_two_processes_and_the_scaler_resumes(
    demo_shards: Path, tmp_path: Path
) -> None:
    check(run(python_cmd(tmp_path, demo_shards, f"train.steps={SWITCH}", *FP16), **INJECT))
    proc = run(
        accelerate_cmd("cpu_debug.yaml", tmp_path, demo_shards, f"train.steps={STEPS}", *FP16), **INJECT
    )
    check(proc)
    assert "world size 1 -> 2" in proc.stderr, proc.stderr[-2000:]
    assert RunDir(tmp_path).marker("done").read_text().startswith(f"step {STEPS}")
    found = states(tmp_path)
    assert [found[s]["world_size"] for s in range(1, STEPS + 1)] == [1] * SWITCH + [2] * (STEPS - SWITCH)
    assert_scaler_rule(found)  # across the resume too: the scale and its tracker went on
    for step in OVERFLOWS:
        assert_overflow_skipped(tmp_path, found, step)
    events = EventAccumulator(str(RunDir(tmp_path).tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss_scale")}
    assert logged == {s: found[s]["scaler"]["scale"] for s in found}
    assert events.Scalars("skipped/overflow")[-1].value == found[STEPS]["meta"]["skipped"]["overflow"]
    # Resumed under DeepSpeed (what `accelerate launch` sets for a DeepSpeed config): refused, nothing
    # written.
    before = {step: checkpoint_contents(path) for step, path in complete_checkpoints(tmp_path)}
    proc = run(
        python_cmd(tmp_path, demo_shards, f"train.steps={STEPS + 2}", *FP16), ACCELERATE_USE_DEEPSPEED="true"
    )
    check(proc, 2)
    assert proc.stderr.strip().splitlines()[-1] == f"error: {DEEPSPEED_FP16}"
    after = {step: checkpoint_contents(path) for step, path in complete_checkpoints(tmp_path)}
    assert_same(before, after, "checkpoints")


def test_deepspeed_fp16_is_refused_before_the_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError) as error:
        make_accelerator(load_config(None, ["train.precision=fp16"]))
    assert str(error.value) == DEEPSPEED_FP16
    assert not torch.distributed.is_initialized()


def test_restore_scaler_ignores_deepspeeds_static_scale_and_caps_the_tracker() -> None:
    def fresh() -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=INTERVAL)

    scaler = fresh()
    restore_scaler(scaler, {"cur_scale": 1.0})  # a bf16 or fp32 ZeRO checkpoint's: not a GradScaler's
    assert scaler_state(scaler) == scaler_state(fresh())
    restore_scaler(scaler, {"scale": 32.0, "_growth_tracker": 7})  # saved under a longer interval
    assert (scaler.get_scale(), scaler.state_dict()["_growth_tracker"]) == (32.0, INTERVAL - 1)
