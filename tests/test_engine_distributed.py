"""Two DDP processes over gloo, started by the users' `accelerate launch` CLI, train on different data.

(DeepSpeed ZeRO-2 training and resuming on 2 processes is tests/test_engine_elastic.py's.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dist_vae.checkpoint import complete_checkpoints
from dist_vae.run_layout import RunDir
from tests.engine_util import LAUNCH, accelerate_cmd, check, checkpoint_contents, recorded, run


@pytest.mark.slow
def test_ddp_two_processes_train_on_different_data(demo_shards: Path, tmp_path: Path) -> None:
    record = tmp_path / "inputs"
    record.mkdir()
    run_dir = tmp_path / "run"
    cmd = accelerate_cmd("cpu_debug.yaml", run_dir, demo_shards, "train.steps=4", "train.accumulate=2")
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", *cmd[len(LAUNCH) :]]  # the users' CLI
    proc = run(cmd, HARNESS_RECORD=str(record))
    check(proc)
    rank0, rank1 = recorded(record, 0), recorded(record, 1)
    assert len(rank0) == len(rank1) == 8  # 4 updates x 2 accumulated micro-batches
    assert not set(rank0) & set(rank1), "both ranks saw the same batches"
    # train.compile=auto stays eager on the CPU, saying nothing.
    assert "train.compile" not in proc.stderr, proc.stderr[-3000:]
    assert RunDir(run_dir).marker("done").is_file()
    final = checkpoint_contents(complete_checkpoints(run_dir)[-1][1])
    assert final["state.json"]["step"] == 4 and final["state.json"]["world_size"] == 2
