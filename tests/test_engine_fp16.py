"""fp16 on the CPU: the trainer's own GradScaler, on 1 and then 2 gloo processes. An
overflowing update is skipped (weights, moments and EMA as they were), halves the scale, is counted
apart from the non-finite updates that stop a run, and the scale grows back after the growth interval;
the scaler's state continues through the resume on another number of processes. DeepSpeed's fp16 is
refused on CPU. The kill -9 bit-exact fp16 case is test_engine_resume.py's, parametrized."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_vae.checkpoint import EMA_FILE, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, complete_checkpoints
from dist_vae.config import ConfigError, load_config
from dist_vae.engine.backend import make_accelerator
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


def test_deepspeed_fp16_is_refused_where_its_accelerator_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        pytest.skip(f"DeepSpeed's {get_accelerator().device_name()} accelerator runs fp16 here")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match=r"'train\.precision' under DeepSpeed: .* has no fp16; use bf16"):
        make_accelerator(load_config(None, ["train.precision=fp16"]))
