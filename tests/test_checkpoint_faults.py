"""Checkpoints under attack and under faults: pickles are refused and never run, corrupt checkpoints
are skipped, a changed model is refused before config.yaml is touched, a full or read-only disk
gives one error line and keeps the previous checkpoint."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from dist_vae.checkpoint import (
    COMPLETE,
    CheckpointError,
    CheckpointWriteError,
    complete_checkpoints,
    load_module_state,
    resolve_resume,
    save_checkpoint,
)
from dist_vae.run_dir import load_run
from dist_vae.run_layout import RunDir
from tests.engine_util import ROOT, accelerate_cmd, check, env, python_cmd, run

STEPS = ["train.steps=4", "train.checkpoint_every=2", "train.eval_every=100", "train.sample_every=100"]


class Payload:
    """Unpickling this creates `marker`: what an attacker's checkpoint would do with a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def write_payload(path: Path, marker: Path) -> None:
    torch.save({"state": Payload(marker)}, path)


@pytest.fixture(scope="module")
def trained(demo_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("trained")
    check(run(python_cmd(run_dir, demo_shards, *STEPS)))
    return run_dir


@pytest.fixture
def copy(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def rehash(path: Path) -> None:
    """Make COMPLETE match the (tampered) files, as an attacker who knows the format would."""
    marker = json.loads((path / COMPLETE).read_text())
    for name in marker["files"]:
        data = (path / name).read_bytes()
        marker["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / COMPLETE).write_text(json.dumps(marker))


def sample(run_dir: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "sample.py"),
        str(run_dir),
        "--n",
        "2",
        "--out",
        str(out),
        *flags,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)


def test_pickle_payloads_are_refused_and_never_run(copy: Path, demo_shards: Path, tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    proof = tmp_path / "proof"  # the payload is live: torch.load(weights_only=False) runs it
    write_payload(tmp_path / "probe.pt", proof)
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert proof.exists()
    newest = RunDir(copy).checkpoint(4)
    for name in ("model.safetensors", "ema.safetensors"):
        write_payload(newest / name, marker)
    rehash(newest)
    proc = run(python_cmd(copy, demo_shards, *STEPS[1:], "train.steps=6", "resume=auto"))
    check(proc, 2)
    assert "model.safetensors is not a readable safetensors file" in proc.stderr.splitlines()[-1]
    for flag, name in (("--no-ema", "model"), ("--ema", "ema")):
        proc = sample(copy, tmp_path / "out", flag)
        assert (
            proc.returncode == 2 and f"{name}.safetensors is not a readable safetensors file" in proc.stderr
        )
    # A format-1 checkpoint (trainer.pt and rank-*.pt pickles) is named and refused, never opened.
    old = RunDir(copy).checkpoint(9)
    old.mkdir()
    write_payload(old / "trainer.pt", marker)
    write_payload(old / "rank-00000.pt", marker)
    (old / COMPLETE).write_text("step 9\nranks 1\n")
    proc = run(python_cmd(copy, demo_shards, *STEPS[1:], "train.steps=12", "resume=auto"))
    check(proc, 2)
    assert "old format 1" in proc.stderr and "no longer loaded" in proc.stderr.splitlines()[-1]
    proc = sample(copy, tmp_path / "out")
    assert proc.returncode == 2 and "old format 1" in proc.stderr
    with pytest.raises(CheckpointError, match="old format 1"):
        resolve_resume(str(old), copy)
    assert not marker.exists(), "a checkpoint's pickle payload ran"


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(
    copy: Path, demo_shards: Path, tmp_path: Path
) -> None:
    model = RunDir(copy).checkpoint(4) / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    record = tmp_path / "inputs"
    record.mkdir()
    proc = run(python_cmd(copy, demo_shards, *STEPS[1:], "train.steps=6"), HARNESS_RECORD=str(record))
    check(proc)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: skipping checkpoint")]
    assert len(warnings) == 1 and "step-00000004" in warnings[0] and "corrupt" in warnings[0]
    assert len((record / "rank-0.txt").read_text().split()) == 4  # resumed at step 2, trained 3..6


def test_refused_resume_names_the_key_and_leaves_config_yaml(copy: Path, demo_shards: Path) -> None:
    before = RunDir(copy).config.read_bytes()
    proc = run(python_cmd(copy, demo_shards, *STEPS[1:], "train.steps=6", "model.channels=8"))
    check(proc, 2)
    line = proc.stderr.splitlines()[-1]
    assert (
        f"checkpoint {RunDir(copy).checkpoint(4)} was trained with model.channels=4, this config has 8"
        in line
    )
    assert RunDir(copy).config.read_bytes() == before


def test_shape_mismatch_names_the_tensor_and_both_shapes() -> None:
    with pytest.raises(CheckpointError) as error:
        load_module_state(nn.Linear(3, 4), nn.Linear(3, 2).state_dict(), Path("ckpt/model.safetensors"))
    message = str(error.value)
    assert "ckpt/model.safetensors: tensor weight has shape [2, 3] but this model's has [4, 3]" in message
    assert "Error(s) in loading" not in message
    with pytest.raises(CheckpointError, match=r"missing tensors \['bias'\]"):
        load_module_state(nn.Linear(3, 2), {"weight": torch.zeros(2, 3)}, Path("x"))


@contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_full_disk_exits_2_and_keeps_the_previous_checkpoint(
    processes: int, trained: Path, demo_shards: Path, tmp_path: Path
) -> None:
    size = sum(f.stat().st_size for f in RunDir(trained).checkpoint(4).iterdir())
    with tmpfs(tmp_path / "small", int(size * 1.6)) as run_dir:  # room for one checkpoint, not two
        if processes == 1:
            proc = run(python_cmd(run_dir, demo_shards, *STEPS))
            check(proc, 2)
        else:  # both ranks learn of rank 0's failure and stop: no hang; the launcher reports failure
            proc = run(accelerate_cmd("cpu_debug.yaml", run_dir, demo_shards, *STEPS))
            assert proc.returncode != 0
        # rank 0's line says why; other ranks' lines (in any order on the shared stderr) point to it
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        line = next(line for line in errors if "(rank 0 reports why)" not in line)
        assert (
            line.startswith("error: cannot write checkpoint ")
            and str(RunDir(run_dir).checkpoint(4, tmp=True)) in line
        )
        assert "no space left on device" in line and re.search(r"needs \d+ bytes, \d+ free", line)
        assert [p.name for p in RunDir(run_dir).checkpoints.iterdir()] == ["step-00000002"]
        assert resolve_resume("auto", run_dir) == RunDir(run_dir).checkpoint(2)
        assert load_run(run_dir).step == 2 and not RunDir(run_dir).marker("done").exists()


def test_read_only_run_dir_exits_2_before_training(trained: Path, demo_shards: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", 16 << 20) as run_dir:
        shutil.copytree(trained, run_dir, dirs_exist_ok=True)
        subprocess.run(["mount", "-o", "remount,ro", str(run_dir)], check=True)
        proc = run(python_cmd(run_dir, demo_shards, *STEPS[1:], "train.steps=6"))
        check(proc, 2)
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: run_dir {run_dir} is not writable: Read-only file system")


def test_read_only_checkpoint_dir_raises_one_line_and_keeps_the_previous(tmp_path: Path) -> None:
    acc = Accelerator(cpu=True)
    net = nn.Linear(3, 2)
    model, optimizer = acc.prepare(net, torch.optim.AdamW(net.parameters()))
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    args = {"model": model, "optimizer": optimizer, "ema": None, "scaler_state": None, "meta": {}, "keep": 3}
    run_dir = tmp_path / "run"
    with tmpfs(run_dir, 1 << 20):
        first = save_checkpoint(acc, run_dir, 1, **args)
        subprocess.run(["mount", "-o", "remount,ro", str(run_dir)], check=True)
        with pytest.raises(CheckpointWriteError) as error:
            save_checkpoint(acc, run_dir, 2, **args)
        message = str(error.value)
        assert "\n" not in message and str(RunDir(run_dir).checkpoint(2, tmp=True)) in message
        assert "not writable" in message and "Read-only file system" in message
        assert [path for _, path in complete_checkpoints(run_dir)] == [first]
        assert resolve_resume("auto", run_dir) == first


def test_complete_marker_names_only_checkpoint_files(tmp_path: Path) -> None:
    path = RunDir(tmp_path).checkpoint(1)
    path.mkdir(parents=True)
    (path / COMPLETE).write_text(
        json.dumps({"format": 2, "files": {"../../secret": {"size": 1, "sha256": ""}}})
    )
    with pytest.raises(CheckpointError, match=r"bad entry '../../secret'"):
        resolve_resume(str(path), tmp_path)
    (path / COMPLETE).write_text("step 1\nranks 2\n")  # format 1's text marker
    with pytest.raises(CheckpointError, match="expected a JSON file"):
        resolve_resume(str(path), tmp_path)
