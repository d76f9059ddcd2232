"""Between log points a training step never waits for the device: over several steps that are
neither log, evaluation nor checkpoint steps, torch.profiler finds no `aten::_local_scalar_dense`
(what `.item()`, `bool(tensor)` and `float(tensor)` run, from Python or from inside an operator) and
no copy to the host, and no Python code of the step calls a tensor's `.tolist()`, `.item()`,
`__bool__`, `__float__`, `__int__`, `.numpy()` or `.cpu()` (`.tolist()` reads CPU memory without an
aten operation, so only this sees it on the CPU; the data pipeline's host tensors are left out), nor
builds a tensor from host data on the run's device with `torch.tensor` or `torch.as_tensor` (on a GPU
a copy from pageable memory that waits for the device; on the CPU no copy at all, so the profiler
cannot tell it from a host tensor). The skip decision, the fp16 scaler and the counts stay on the
device; a divergence is read at the next log point.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from dist_vae.checkpoint import complete_checkpoints
from dist_vae.config import load_config
from dist_vae.engine import step as step_module
from dist_vae.engine.step import TrainingDiverged
from dist_vae.engine.trainer import Trainer
from dist_vae.models.output import LossOutput
from dist_vae.run_layout import RunDir
from tests.engine_util import train_args

# 10 steps; only step 10 logs, evaluates, samples or saves. Steps 3..7 are profiled.
QUIET = ["train.steps=10", "train.log_every=10", "train.eval_every=10", "train.sample_every=10",
         "train.checkpoint_every=10"]  # fmt: skip
FIRST, LAST = 2, 7  # before_step(2) .. before_step(7): the updates that make steps 3 to 7
SYNCS = ("aten::_local_scalar_dense", "aten::item")
READERS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")
BUILDERS = ("tensor", "as_tensor")  # given a device: host data copied there
STEP_CODE = ("dist_vae/engine/", "dist_vae/distributed.py", "dist_vae/models/", "dist_vae/compat/")


def counting(
    original: Callable[..., object],
    key: str,
    counts: Counter[str],
    active: list[bool],
    counted: Callable[..., bool] = lambda *args, **kwargs: True,
) -> Callable[..., object]:
    """`original`, counting under `key` its calls by the step's own code while `active[0]`."""

    def call(*args: object, **kwargs: object) -> object:
        caller = sys._getframe(1).f_code.co_filename
        if active[0] and any(part in caller for part in STEP_CODE) and counted(*args, **kwargs):
            counts[key] += 1
        return original(*args, **kwargs)

    return call


def on_a_device(*args: object, device: object = None, **_: object) -> bool:
    """Whether torch.tensor / torch.as_tensor was given a device (as_tensor takes it third)."""
    return device is not None or len(args) > 2


@contextmanager
def python_reads(counts: Counter[str], active: list[bool]) -> Iterator[None]:
    """Counts the calls of READERS, and of BUILDERS given a device, made by the step's own code while
    `active[0]`."""
    patches: dict[tuple[object, str], Callable[..., object]] = {}
    for name in READERS:
        patches[torch.Tensor, name] = counting(getattr(torch.Tensor, name), f"Tensor.{name}", counts, active)
    for name in BUILDERS:
        patches[torch, name] = counting(
            getattr(torch, name), f"torch.{name}(device=)", counts, active, on_a_device
        )
    originals = {(owner, name): getattr(owner, name) for owner, name in patches}
    for (owner, name), replacement in patches.items():
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


INPUTS: set[tuple[int, tuple[int, ...]]] = set()  # (address, shape) of the model's inputs, profiled steps


def host_reads(run_dir: Path, shards: Path, *overrides: str) -> Counter[str]:
    """Names and counts of the host reads and device-to-host copies in the profiled steps; the
    model's inputs there in INPUTS."""
    args = train_args(run_dir, shards, *QUIET, *overrides)
    cfg = load_config(Path(args[1]), args[2:])
    prof = profile(activities=[ProfilerActivity.CPU])
    INPUTS.clear()
    active = [False]

    def record(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if active[0]:
            INPUTS.add((inputs[0].data_ptr(), tuple(inputs[0].shape)))

    def around(step: int) -> None:
        if step == FIRST:
            prof.start()
        elif step == LAST:
            prof.stop()
        active[0] = FIRST <= step < LAST

    trainer = Trainer(cfg, before_step=around)
    trainer.backend.model.register_forward_pre_hook(record)
    counts: Counter[str] = Counter()
    with python_reads(counts, active):
        trainer.fit()
    for event in prof.events():
        reads = event.name in SYNCS or "DtoH" in event.name or "Memcpy D2H" in event.name
        if reads and not fused_kernel(event):
            counts[event.name] += 1
    return counts


def fused_kernel(event: object) -> bool:
    """Inside the fused AdamW's CPU kernel, which reads each parameter's step count from host memory
    (its CUDA kernel reads them on the device): no synchronisation, and none on a GPU."""
    parent = event.cpu_parent  # type: ignore[attr-defined]
    while parent is not None:
        if parent.name == "aten::_fused_adamw_":
            return True
        parent = parent.cpu_parent
    return False


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_steps_between_log_points_read_nothing_from_the_device(
    demo_shards: Path, tmp_path: Path, precision: str
) -> None:
    assert host_reads(tmp_path, demo_shards, f"train.precision={precision}") == Counter()
    # What a captured step (train.cuda_graphs) needs of its inputs: one address, one shape.
    assert len(INPUTS) == 1, INPUTS


def test_the_count_sees_an_item_put_back_into_the_step(
    demo_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test above can fail: one `.item()` per step in the skip decision is found, five times."""
    decide = step_module.UpdateGate.decide_on_device

    def reading(gate: step_module.UpdateGate, step: int, norm: torch.Tensor, *flags: torch.Tensor) -> object:
        norm.item()
        return decide(gate, step, norm, *flags)

    monkeypatch.setattr(step_module.UpdateGate, "decide_on_device", reading)
    assert host_reads(tmp_path, demo_shards)["aten::_local_scalar_dense"] == LAST - FIRST


def test_a_divergence_between_log_points_stops_at_the_next_one_without_saving(
    demo_shards: Path, tmp_path: Path
) -> None:
    """NaN losses from update 5 on, max_nonfinite_skips=2: diverged at step 6 on the device, read at
    step 8 (the next log and checkpoint step), where the run stops saving nothing; the checkpoint of
    step 4 is the last, and the message tells what happened at step 6."""
    overrides = ["train.steps=20", "train.log_every=8", "train.checkpoint_every=4", "train.eval_every=100",
                 "train.sample_every=100", "train.max_nonfinite_skips=2"]  # fmt: skip
    args = train_args(tmp_path, demo_shards, *overrides)
    trainer = Trainer(load_config(Path(args[1]), args[2:]))
    calls = [0]

    def poison(_module: torch.nn.Module, _inputs: object, out: LossOutput) -> LossOutput:
        calls[0] += 1
        return dataclasses.replace(out, loss=out.loss * math.nan) if calls[0] >= 5 else out

    trainer.backend.model.register_forward_hook(poison)
    with pytest.raises(TrainingDiverged) as error:
        trainer.fit()
    assert trainer.step == 8
    assert "2 consecutive non-finite updates since step 5; last good checkpoint: " in str(error.value)
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [4]
    assert RunDir(tmp_path).marker("diverged").read_text().startswith("step 8\n")
