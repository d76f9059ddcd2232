"""The on-disk format of a checkpoint (format 2) in `RunDir.checkpoint(step)`, and its reading.

    model.safetensors      the raw module's state dict, parameters as full fp32 (gathered under ZeRO)
    ema.safetensors        the EMA weights, when the run keeps them
    optimizer.safetensors  per-parameter-name optimizer state (`exp_avg/<name>`, ...)
    optimizer.json         per group: parameter names, state keys, hyperparameters
    state.json             step, world size, the caller's `meta` (resolved config, data position,
                           skip statistics), EMA count, loss scaler, DeepSpeed's counters
    COMPLETE               JSON: format, step, world size, every file's size and sha256

A checkpoint is read only as safetensors and JSON, so nothing in it can run code. Its `COMPLETE`
marker (JSON) lists every file with its size and sha256: a torn or corrupt checkpoint is recognised
and the newest one that verifies is used instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from dist_vae.errors import CheckpointError
from dist_vae.files import file_sha256
from dist_vae.run_layout import RunDir

FORMAT = 2
COMPLETE = "COMPLETE"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
STATE_FILE = "state.json"
FILES = {MODEL_FILE, EMA_FILE, OPTIMIZER_FILE, OPTIMIZER_META, STATE_FILE}


def is_complete_dir(path: Path) -> bool:
    return RunDir.checkpoint_step(path) is not None and (path / COMPLETE).is_file()


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint directory with a COMPLETE marker, oldest first (not verified)."""
    root = RunDir(run_dir).checkpoints
    if not root.is_dir():
        return []
    return sorted((int(p.name[5:]), p) for p in root.iterdir() if is_complete_dir(p))


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: expected a JSON file ({exc})") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds {type(value).__name__}, expected a JSON object")
    return value


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file; anything else (a pickle above all) is refused without being interpreted."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc


def refuse_format_1(path: Path) -> None:
    """Format 1 kept pickles (trainer.pt, rank-*.pt): it is named and refused, never opened."""
    if (path / "trainer.pt").exists() or any(path.glob("rank-*.pt")):
        raise CheckpointError(
            f"checkpoint {path} is in the old format 1 (pickle files trainer.pt, rank-*.pt), which is no "
            "longer loaded because unpickling can run code; start a new run (resume=never or a new run_dir)"
        )


def read_marker(path: Path) -> dict[str, Any]:
    """The COMPLETE marker of a format-2 checkpoint."""
    refuse_format_1(path)
    marker = read_json(path / COMPLETE)
    files = marker.get("files")
    if marker.get("format") != FORMAT or not isinstance(files, dict):
        raise CheckpointError(
            f"{path / COMPLETE}: format {marker.get('format')!r}, expected {FORMAT} and a file list"
        )
    for name, entry in files.items():
        if name not in FILES or not isinstance(entry, dict) or set(entry) != {"size", "sha256"}:
            raise CheckpointError(
                f"{path / COMPLETE}: bad entry {name!r}; expected files among {sorted(FILES)}"
            )
    return marker


def verify(path: Path) -> dict[str, Any]:
    """The marker, once every file it lists has the recorded size and sha256 (CheckpointError otherwise)."""
    marker = read_marker(path)
    for name, entry in marker["files"].items():
        file = path / name
        if not file.is_file() or file.stat().st_size != entry["size"]:
            raise CheckpointError(f"{file} is missing or not {entry['size']} bytes as recorded in {COMPLETE}")
        if file_sha256(file) != entry["sha256"]:
            raise CheckpointError(
                f"{file} is corrupt: its sha256 differs from the one recorded in {COMPLETE}"
            )
    return marker


def newest_verified(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; each corrupt newer one costs a one-line warning."""
    for _, path in reversed(complete_checkpoints(run_dir)):
        refuse_format_1(path)
        try:
            verify(path)
        except CheckpointError as exc:
            print(f"warning: skipping checkpoint {path.name}: {exc}", file=sys.stderr)
            continue
        return path
    return None


def check_tensors(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: Path) -> None:
    """CheckpointError naming the first tensor whose name or shape differs between `own` and `tensors`."""
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit this model: missing tensors {missing[:5]}, unexpected {unexpected[:5]} "
            "(was the model configuration changed?)"
        )
    for name, value in own.items():
        if value.shape != tensors[name].shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {list(tensors[name].shape)} but this model's "
                f"has {list(value.shape)} (was the model configuration changed?)"
            )


def load_module_state(module: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """`module.load_state_dict(tensors)`, a mismatch named in one line instead of torch's list."""
    check_tensors(module.state_dict(), tensors, source)
    module.load_state_dict(tensors)
