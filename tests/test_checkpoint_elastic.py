"""A checkpoint written by 2 processes loads on 1 and on 3 (DDP over gloo, DeepSpeed ZeRO-1 and
ZeRO-2 on CPU), and under the other backend: every weight and optimizer state tensor exactly as saved."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_vae.checkpoint import (
    EMA_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    OPTIMIZER_META,
    STATE_FILE,
)
from dist_vae.run_layout import RunDir
from tests.engine_util import LAUNCH, ROOT, check, free_port, run

HARNESS = ROOT / "tests" / "checkpoint_harness.py"


def launch(config: str, precision: str, processes: int, mode: str, run_dir: Path) -> None:
    cmd = [*LAUNCH, "--config_file", str(ROOT / "configs" / "accelerate" / config),
           "--num_processes", str(processes), "--main_process_port", str(free_port()),
           "--mixed_precision", precision,
           str(HARNESS), mode, str(run_dir)]  # fmt: skip
    check(run(cmd, timeout=400))


def tensors(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(path / name) for name in (MODEL_FILE, OPTIMIZER_FILE, EMA_FILE)}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("saver", "precision", "loaders"),
    [
        ("cpu_debug.yaml", "no", [("cpu_debug.yaml", 1), ("cpu_debug.yaml", 3)]),
        # bf16 weights, fp32 master copy saved; ZeRO's partitions onto one process: ZeRO-2's case below
        ("deepspeed_zero1.yaml", "bf16", [("deepspeed_zero1.yaml", 3)]),
        ("deepspeed_zero2.yaml", "no", [("deepspeed_zero2.yaml", 1), ("deepspeed_zero2.yaml", 3),
                                        ("cpu_debug.yaml", 3)]),
    ],
)  # fmt: skip
def test_two_process_checkpoint_loads_on_one_and_three(
    saver: str, precision: str, loaders: list[tuple[str, int]], tmp_path: Path
) -> None:
    saved = tmp_path / "saved"
    launch(saver, precision, 2, "save", saved)
    original = tensors(RunDir(saved).checkpoint(3))
    trained_in = json.loads((RunDir(saved).checkpoint(3) / STATE_FILE).read_text())["meta"]["dtype"]
    assert trained_in == ("torch.bfloat16" if precision == "bf16" else "torch.float32")
    n_params = len(original[MODEL_FILE])
    assert {value.dtype for value in original[MODEL_FILE].values()} == {torch.float32}
    assert len(original[OPTIMIZER_FILE]) == 3 * n_params  # exp_avg, exp_avg_sq, step per parameter
    assert {float(v) for k, v in original[OPTIMIZER_FILE].items() if k.startswith("step/")} == {3.0}
    for loader, processes in loaders:
        run_dir = tmp_path / f"{loader}-{processes}"
        shutil.copytree(saved, run_dir)
        launch(loader, precision, processes, "load", run_dir)  # loads step 3, saves it again as step 4
        resaved = RunDir(run_dir).checkpoint(4)
        assert json.loads((resaved / STATE_FILE).read_text())["world_size"] == processes
        again = tensors(resaved)
        for file, contents in original.items():
            assert contents.keys() == again[file].keys(), file
            for name, value in contents.items():
                other = again[file][name]
                assert value.dtype == other.dtype and torch.equal(value, other), (
                    f"{loader} x{processes}: {file} {name}"
                )
        assert (RunDir(saved).checkpoint(3) / OPTIMIZER_META).read_text() == (
            resaved / OPTIMIZER_META
        ).read_text()
