"""What a run says: bits/dim on the progress bar and at validation, where a resume
starts, each changed key, a finished run's one line; config.yaml only ever says what trained the
newest checkpoint, and the changes are kept in config_changes.jsonl."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_vae.checkpoint import STATE_FILE, complete_checkpoints, read_json
from dist_vae.config import load_config
from dist_vae.run_layout import RunDir
from tests.engine_util import check, python_cmd, run

STEPS = ["train.steps=4"]


@pytest.fixture(scope="module")
def finished(
    demo_shards: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess]:
    """A 4-step run (train.lr=1e-3, validation at step 4) and what it printed."""
    run_dir = tmp_path_factory.mktemp("finished")
    proc = run(python_cmd(run_dir, demo_shards, *STEPS))
    check(proc)
    return run_dir, proc


def test_the_bar_and_validation_show_bits_per_dim(finished: tuple[Path, subprocess.CompletedProcess]) -> None:
    run_dir, proc = finished
    assert "bpd=" in proc.stderr and "loss=" not in proc.stderr
    lines = re.findall(r"^step 4: validation bits/dim (\S+)$", proc.stderr, re.M)
    events = EventAccumulator(str(RunDir(run_dir).tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    assert [float(v) for v in lines] == [pytest.approx(events.Scalars("val/bpd")[0].value, abs=1e-4)]
    bar = re.findall(r"bpd=(\S+?)\]", proc.stderr)[-1]
    assert float(bar) == pytest.approx(events.Scalars("train/bpd")[-1].value, rel=1e-3)


def test_a_rerun_of_a_finished_run_says_so_and_trains_nothing(
    finished: tuple[Path, subprocess.CompletedProcess], demo_shards: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(finished[0], copy)
    proc = run(python_cmd(copy, demo_shards, *STEPS))
    check(proc)
    lines = proc.stderr.splitlines()
    assert f"resumed from step 4 ({RunDir(copy).checkpoint(4)})" in lines
    assert any(line.startswith("run already finished: step 4 of train.steps=4") for line in lines)
    assert "4/4" not in proc.stderr  # no full progress bar for nothing
    assert not any(":" in line and "->" in line for line in lines), "a copied run dir is not a change"
    assert "samples:" in proc.stdout and "checkpoints:" in proc.stdout  # they exist


def test_changed_keys_print_one_line_each_and_reach_config_yaml_with_a_checkpoint(
    finished: tuple[Path, subprocess.CompletedProcess], demo_shards: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(finished[0], copy)
    before = RunDir(copy).config.read_bytes()
    # A finished run: the changes are announced, nothing trains, config.yaml keeps what trained step 4.
    changes = {"train.lr=5e-3": "train.lr: 0.001 -> 0.005", "train.steps=2": "train.steps: 4 -> 2"}
    for override, line in changes.items():
        proc = run(python_cmd(copy, demo_shards, *STEPS, override))
        check(proc)
        assert f"{line} from step 4" in proc.stderr.splitlines()
        assert "run already finished" in proc.stderr
        assert RunDir(copy).config.read_bytes() == before
        assert not RunDir(copy).config_changes.exists() and not RunDir(copy).pending_config.exists()
    # More steps: the new config.yaml arrives with the first checkpoint it trained, and stays in the history.
    proc = run(python_cmd(copy, demo_shards, "train.steps=6", "train.lr=5e-3"))
    check(proc)
    lines = proc.stderr.splitlines()
    assert "train.steps: 4 -> 6 from step 4" in lines and "train.lr: 0.001 -> 0.005 from step 4" in lines
    assert complete_checkpoints(copy)[-1][0] == 6
    written = load_config(RunDir(copy).config)
    assert (written.train.steps, written.train.lr) == (6, 5e-3)
    trained = read_json(complete_checkpoints(copy)[-1][1] / STATE_FILE)["meta"]["config"]["train"]
    assert (trained["steps"], trained["lr"]) == (6, 5e-3)
    history = [json.loads(line) for line in RunDir(copy).config_changes.read_text().splitlines()]
    assert [(h["from_step"], h["checkpoint_step"], h["changes"]) for h in history] == [
        (4, 6, {"train.steps": [4, 6], "train.lr": [0.001, 0.005]})
    ]
    assert not RunDir(copy).pending_config.exists()
