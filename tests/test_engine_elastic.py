"""A run continues on another number of processes: a 2-process run stopped at step 4 is
finished on 1 and on 3 processes under both train.resize policies (DDP; DeepSpeed ZeRO-2 in bf16,
2 -> 2 -> 1), with the step count, the data position, the LR schedule and the global batch (or the
scaled LR) as promised; resuming on the same new world size twice gives identical checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_vae.checkpoint import STATE_FILE
from dist_vae.config import ConfigError, load_config
from dist_vae.engine.checkpointing import resized_config
from dist_vae.engine.step import lr_factor
from dist_vae.run_layout import RunDir
from tests.engine_util import (
    accelerate_cmd,
    assert_same,
    check,
    checkpoint_contents,
    python_cmd,
    recorded,
    run,
)

K, STEPS, LR, WARMUP = 4, 8, 1e-3, 6
# Per-rank batch 6 on 2 processes: global batch 12, which 1 and 3 processes can keep. A constant
# schedule whose warm-up outlasts the first part shows a schedule that restarted.
RUN = ["data.batch_size=6", "train.schedule=constant", f"train.warmup={WARMUP}", f"train.lr={LR}"]
BF16 = ["train.precision=bf16"]


def launch(config: str, processes: int, run_dir: Path, shards: Path, *overrides: str) -> list[str]:
    cmd = accelerate_cmd(config, run_dir, shards, *RUN, *overrides)
    cmd[cmd.index("--num_processes") + 1] = str(processes)
    return cmd


@pytest.fixture(scope="module")
def stopped(demo_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-process DDP run that ended at step K (of what becomes a STEPS-step run)."""
    run_dir = tmp_path_factory.mktemp("two")
    check(run(launch("cpu_debug.yaml", 2, run_dir, demo_shards, f"train.steps={K}")))
    return run_dir


def resume(stopped: Path, run_dir: Path, cmd: list[str]) -> str:
    """Copy the stopped run to `run_dir`, run `cmd` on it to STEPS; its stderr."""
    shutil.copytree(stopped, run_dir)
    proc = run(cmd, timeout=300)
    check(proc)
    assert RunDir(run_dir).marker("done").read_text().startswith(f"step {STEPS}")
    return proc.stderr


def final_state(run_dir: Path) -> dict:
    return json.loads((RunDir(run_dir).checkpoint(STEPS) / STATE_FILE).read_text())


def logged_lr(run_dir: Path) -> dict[int, float]:
    events = EventAccumulator(str(RunDir(run_dir).tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    return {event.step: event.value for event in events.Scalars("lr/main")}


def assert_continued(run_dir: Path, world: int, global_batch: int, lr_scale: float) -> None:
    """Step, data position, global batch and LR schedule carried on from step K on `world` processes."""
    state = final_state(run_dir)
    meta = state["meta"]
    assert (state["step"], state["world_size"], meta["global_batch"]) == (STEPS, world, global_batch)
    assert meta["data"]["position"] == K * 12 + (STEPS - K) * global_batch  # nothing repeated or skipped
    assert meta["reference_global_batch"] == 12
    lrs = logged_lr(run_dir)  # logged after step s: the LR step s-1 trained with
    for step in (K + 2, STEPS):
        expected = LR * lr_scale * lr_factor(step - 1, WARMUP, STEPS, "constant")
        assert lrs[step] == pytest.approx(expected, rel=1e-6), (step, lrs)
    assert lrs[2] == pytest.approx(LR * lr_factor(1, WARMUP, STEPS, "constant"), rel=1e-6)


@pytest.mark.slow
def test_two_to_one_keeps_the_global_batch_and_is_reproducible(
    stopped: Path, demo_shards: Path, tmp_path: Path
) -> None:
    runs = [tmp_path / "first", tmp_path / "second"]
    for run_dir in runs:
        stderr = resume(stopped, run_dir, python_cmd(run_dir, demo_shards, *RUN, f"train.steps={STEPS}"))
        line = f"resumed step {K} on world size 2 -> 1: keep_global_batch, global batch 12 = 1 x 6 x 2"
        assert f"{line} (accumulate 1 -> 2)" in stderr.splitlines(), stderr[-3000:]
        assert_continued(run_dir, 1, 12, 1.0)
    first, second = (checkpoint_contents(RunDir(r).checkpoint(STEPS)) for r in runs)
    assert_same(first, second)


@pytest.mark.slow
def test_two_to_three_keeps_the_global_batch_with_a_smaller_batch(
    stopped: Path, demo_shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    stderr = resume(
        stopped, run_dir, launch("cpu_debug.yaml", 3, run_dir, demo_shards, f"train.steps={STEPS}")
    )
    assert "world size 2 -> 3: keep_global_batch, global batch 12 = 3 x 4 x 1 (batch 6 -> 4)" in stderr
    assert stderr.count("resumed step") == 1  # rank 0 alone
    assert_continued(run_dir, 3, 12, 1.0)


@pytest.mark.slow
def test_two_to_one_with_scale_lr_halves_the_lr(stopped: Path, demo_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = python_cmd(run_dir, demo_shards, *RUN, f"train.steps={STEPS}", "train.resize=scale_lr")
    stderr = resume(stopped, run_dir, cmd)
    assert "world size 2 -> 1: scale_lr, global batch 12 -> 6 = 1 x 6 x 1, lr x 0.5" in stderr
    assert_continued(run_dir, 1, 6, 0.5)


@pytest.mark.slow
def test_deepspeed_zero2_resumes_on_two_then_continues_on_one(demo_shards: Path, tmp_path: Path) -> None:
    """ZeRO-2 in bf16 (the LSUN configs' precision) on 2 ranks stops at step 2 and resumes to K (only
    the missing updates run, DeepSpeed's own counters kept); its partitioned optimizer state then
    continues on 1 with accumulation 2."""
    run_dir, record = tmp_path / "run", tmp_path / "inputs"
    record.mkdir()

    def zero2(processes: int, steps: int) -> list[str]:
        return launch("deepspeed_zero2.yaml", processes, run_dir, demo_shards, f"train.steps={steps}", *BF16)

    check(run(zero2(2, 2), timeout=300))
    first = checkpoint_contents(RunDir(run_dir).checkpoint(2))
    assert first["state.json"]["engine"]["global_steps"] == 2
    check(run(zero2(2, K), timeout=300, HARNESS_RECORD=str(record)))
    assert len(recorded(record, 0)) == len(recorded(record, 1)) == K - 2
    resumed = checkpoint_contents(RunDir(run_dir).checkpoint(K))
    assert resumed["state.json"]["engine"]["global_steps"] == K
    before, after = first["model.safetensors"], resumed["model.safetensors"]
    assert any(not torch.equal(before[k], after[k]) for k in before)
    proc = run(zero2(1, STEPS), timeout=300)
    check(proc)
    assert (
        "world size 2 -> 1: keep_global_batch, global batch 12 = 1 x 6 x 2 (accumulate 1 -> 2)" in proc.stderr
    )
    assert_continued(run_dir, 1, 12, 1.0)
    engine = final_state(run_dir)["engine"]  # DeepSpeed counted 12 samples per update throughout
    assert (engine["global_steps"], engine["global_samples"]) == (STEPS, STEPS * 12)


def write_state(path: Path, world: int, global_batch: int, reference: int | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    meta = {"global_batch": global_batch} | ({"reference_global_batch": reference} if reference else {})
    (path / STATE_FILE).write_text(json.dumps({"step": 7, "world_size": world, "meta": meta}))
    return path


@pytest.mark.parametrize(
    ("batch", "accumulate", "world", "expected"),
    [
        (8, 1, 1, (8, 2)),  # 2 x 8 x 1 -> 1 x 8 x 2: accumulation first
        (8, 1, 4, (4, 1)),  # 16 / 4 = 4 per rank < 8: the batch shrinks
        (8, 2, 2, (8, 1)),  # the config asked 32 on the same world size: the checkpoint's 16 is kept
        (5, 1, 8, (2, 1)),  # 2 per rank: the largest divisor below 5
        (3, 1, 1, (2, 8)),  # 16 on 1 process with a batch of at most 3: 2 x 8
    ],
)
def test_keep_global_batch_arithmetic(
    batch: int, accumulate: int, world: int, expected: tuple[int, int], tmp_path: Path
) -> None:
    cfg = load_config(None, [f"data.batch_size={batch}", f"train.accumulate={accumulate}"])
    new, resize = resized_config(cfg, batch, write_state(tmp_path, 2, 16), world)
    assert (new.data.batch_size, new.train.accumulate) == expected
    assert world * new.data.batch_size * new.train.accumulate == 16 and resize.lr_scale == 1.0


def test_keep_global_batch_refuses_a_world_size_that_cannot_divide_it(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.batch_size=4"])
    with pytest.raises(ConfigError, match=r"global batch 8 .* on 3 processes: .*\[1, 2, 4, 8\].*scale_lr"):
        resized_config(cfg, 4, write_state(tmp_path, 2, 8), 3)


def test_scale_lr_is_relative_to_the_first_global_batch(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.batch_size=4", "train.resize=scale_lr"])
    new, resize = resized_config(cfg, 4, write_state(tmp_path, 3, 12, reference=8), 2)
    assert new is cfg and resize.global_batch == (12, 8) and resize.lr_scale == 1.0
    assert "world size 3 -> 2: scale_lr, global batch 12 -> 8 = 2 x 4 x 1" in resize.line()
    _, resize = resized_config(cfg, 4, write_state(tmp_path, 2, 8), 3)
    assert resize.lr_scale == 1.5 and ", lr x 1.5 " in resize.line()
    _, resize = resized_config(cfg, 4, write_state(tmp_path, 2, 8), 2)
    assert resize.line() == ""  # same world size, same batch: nothing to say, nothing changed


def test_resize_policy_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"train\.resize.*'keep_global_batch', 'scale_lr'"):
        load_config(None, ["train.resize=halve"])
