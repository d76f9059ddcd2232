"""Helpers for the engine tests: launching real training processes and comparing checkpoints."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from dist_vae.checkpoint import STATE_FILE

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "engine_harness.py"
# `accelerate launch`'s own code without the CLI's start-up, which imports every subcommand (its
# `estimate` loads transformers: about 2 s a launch), as cluster/node.sh runs it.
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]

# A tiny IterativeVAE (well under a second per CPU step). Its reparameterisation noise comes from
# the global RNG, so a resume that failed to restore the RNG streams would show.
TINY = [
    "data.resolution=16",  # the stream resizes the 32 px demo shards on the fly
    "data.batch_size=4",
    "data.num_workers=0",
    "data.shuffle_group=2",
    "model.kind=iterative_vae",
    "model.refine_steps=2",
    "model.latent_dims=[2,2]",
    "model.channels=4",
    "model.kl_warmup=0",
    "train.lr=1e-3",
    "train.warmup=2",
    "train.log_every=2",
    "train.eval_every=4",
    "train.eval_batches=2",
    "train.sample_every=4",
    "train.sample_count=4",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=2",
    "train.ema_decay=0.9",
]


def recorded(record: Path, rank: int) -> list[str]:
    """The checksums of the training batches `rank` read, one per micro-batch (HARNESS_RECORD=record)."""
    return (record / f"rank-{rank}.txt").read_text().split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(run_dir: Path, shards: Path, *overrides: str) -> list[str]:
    config = str(ROOT / "configs" / "debug.yaml")
    return ["--config", config, f"run_dir={run_dir}", f"data.path={shards}", *TINY, *overrides]


def python_cmd(run_dir: Path, shards: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(HARNESS), *train_args(run_dir, shards, *overrides)]


def accelerate_cmd(config: str, run_dir: Path, shards: Path, *overrides: str) -> list[str]:
    return [*LAUNCH, "--config_file", str(ROOT / "configs" / "accelerate" / config),
            "--num_processes", "2", "--main_process_port", str(free_port()),
            str(HARNESS), *train_args(run_dir, shards, *overrides)]  # fmt: skip


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def run(cmd: list[str], timeout: float = 240, **extra_env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env(**extra_env), capture_output=True, text=True, timeout=timeout
    )
    return proc


def check(proc: subprocess.CompletedProcess, code: int = 0) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}\n{proc.stderr[-4000:]}"


def checkpoint_contents(path: Path) -> dict[str, Any]:
    """Every file of a checkpoint directory, loaded: safetensors files as tensors, JSON as data. The
    run's provenance (state.json's resolved config, which names the run dir; COMPLETE, which hashes
    it) is left out so that two runs of the same training compare equal."""
    contents: dict[str, Any] = {}
    for file in sorted(path.iterdir()):
        if file.suffix == ".safetensors":
            contents[file.name] = load_file(file)
        elif file.suffix == ".json":
            contents[file.name] = json.loads(file.read_text())
    contents[STATE_FILE]["meta"].pop("config")
    return contents


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Recursive exact equality of nested checkpoint contents; the message names the first difference."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), (
            f"tensor differs at {where}"
        )
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), f"array differs at {where}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"keys differ at {where}: {set(a) ^ set(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"length differs at {where}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"value differs at {where}: {a!r} != {b!r}"


def count_tensors(contents: Any) -> int:
    if isinstance(contents, torch.Tensor):
        return 1
    if isinstance(contents, dict):
        return sum(count_tensors(v) for v in contents.values())
    if isinstance(contents, (list, tuple)):
        return sum(count_tensors(v) for v in contents)
    return 0
