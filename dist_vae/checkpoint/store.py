"""Saving, rotating and loading checkpoints (the files of format.py, the state of state.py).

Every rank takes part in gathering (ZeRO); rank 0 writes into `.tmp-step-%08d.HOST-PID-RANDOM/` (a
name unique to the process), fsyncs each file, renames the directory and fsyncs its parent, so a kill
at any moment leaves the previous checkpoints or the new one. A failed write (disk full, read-only)
removes the temporary directory, keeps the older checkpoints and raises `CheckpointWriteError` on
every rank. Random states are not saved: the trainer re-derives them from (seed, step, rank).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import save
from torch import nn

from dist_vae.checkpoint.format import (
    COMPLETE,
    EMA_FILE,
    FORMAT,
    MODEL_FILE,
    OPTIMIZER_FILE,
    OPTIMIZER_META,
    STATE_FILE,
    check_tensors,
    complete_checkpoints,
    is_complete_dir,
    newest_verified,
    read_json,
    read_marker,
    read_tensors,
    refuse_format_1,
    verify,
)
from dist_vae.checkpoint.state import (
    AveragedWeights,
    engine_counters,
    full_weights,
    load_optimizer_state,
    load_weights,
    optimizer_state,
    restore_engine_counters,
)
from dist_vae.errors import CheckpointError
from dist_vae.files import process_tag, replace_dir, write_synced
from dist_vae.run_layout import RunDir


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written; the message is one line: which path, why, bytes needed."""


def config_dict(cfg: Any) -> dict[str, Any]:
    """The resolved configuration (a dataclass: config.py's Config, which this component does not
    import, being below it) as plain JSON-able data, kept in every checkpoint's state.json."""
    return dataclasses.asdict(cfg)


@dataclass
class Checkpoint:
    path: Path
    step: int
    world_size: int
    meta: dict[str, Any]
    scaler_state: dict[str, Any] | None


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint to start from: `auto` -> the newest one that verifies (or none), `never` -> none,
    else that directory, which must verify."""
    if resume == "never":
        return None
    if resume == "auto":
        return newest_verified(run_dir)
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise CheckpointError(
            f"bad value {resume!r} for 'resume': {path} is not a complete checkpoint directory "
            f"(no {COMPLETE} marker); expected auto, never or such a directory"
        )
    refuse_format_1(path)
    verify(path)
    return path


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}.{key}").items()}


# Keys that name where a run lives, not how it trains: a copied run directory differs in them alone.
_PLACE_KEYS = ("run_dir", "resume")


def config_changes(path: Path, cfg: Any) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (the checkpoint's value, this config's)} for every training key that differs."""
    saved = read_json(path / STATE_FILE).get("meta", {}).get("config", {})
    current = json.loads(_json(config_dict(cfg)))  # as state.json holds it: tuples become lists
    old = {key: v for top, item in saved.items() for key, v in _flatten(item, top).items()}
    new = {key: v for top, item in current.items() for key, v in _flatten(item, top).items()}
    return {key: (old.get(key), v) for key, v in new.items() if old.get(key) != v and key not in _PLACE_KEYS}


def check_resume(path: Path, cfg: Any) -> None:
    """Refuse (CheckpointError naming the first differing key) to continue `path` with a model or
    resolution other than the one it was trained with; run before anything is written."""
    read_marker(path)
    saved = read_json(path / STATE_FILE).get("meta", {}).get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path / STATE_FILE} holds no resolved configuration (meta.config)")
    current = config_dict(cfg)
    resolution = saved.get("data", {}).get("resolution")
    old = _flatten(saved.get("model", {}), "model") | {"data.resolution": resolution}
    new = _flatten(current["model"], "model") | {"data.resolution": current["data"]["resolution"]}
    for key, value in new.items():
        if key in old and old[key] != value:
            raise CheckpointError(
                f"checkpoint {path} was trained with {key}={old[key]}, this config has {value}; "
                "resume=never (or another run_dir) starts a new run"
            )


def clean_partial(run_dir: Path) -> None:
    """Remove directories left by a save that was killed before its rename (rank 0, before training,
    under the run directory's lease: every temporary found then belongs to an owner that is gone)."""
    root = RunDir(run_dir).checkpoints
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and not is_complete_dir(path):
                shutil.rmtree(path, ignore_errors=True)


def _json(value: Any) -> bytes:
    return json.dumps(value, indent=1).encode()


def _any_rank(acc: Accelerator, flag: bool) -> bool:
    """Whether `flag` holds on any rank (every rank calls this)."""
    if acc.num_processes == 1:
        return flag
    votes = torch.tensor([float(flag)], device=acc.device)
    torch.distributed.all_reduce(votes)
    return bool(votes[0] > 0)


def _write_error(exc: OSError, tmp: Path, needed: int) -> str:
    where = exc.filename or tmp
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        existing = next(p for p in (tmp, *tmp.parents) if p.exists())
        free = shutil.disk_usage(existing).free
        return f"cannot write checkpoint {where}: no space left on device (needs {needed} bytes, {free} free)"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write checkpoint {where}: the directory is not writable ({exc.strerror})"
    return f"cannot write checkpoint {where}: {exc.strerror or exc}"


def _write(tmp: Path, files: dict[str, bytes], step: int, world_size: int) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    listed = {}
    for name, data in files.items():
        write_synced(tmp / name, data)
        listed[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    marker = {"format": FORMAT, "step": step, "world_size": world_size, "files": listed}
    write_synced(tmp / COMPLETE, _json(marker))


def save_checkpoint(
    acc: Accelerator,
    run_dir: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: AveragedWeights | None,
    scaler_state: dict[str, Any] | None,
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """Collective: every rank calls it at the same step. Returns the final directory; keeps the
    newest `keep` checkpoints."""
    weights = full_weights(acc, model)
    optimizer_tensors, optimizer_meta = optimizer_state(acc, model, optimizer)
    final, tmp = RunDir(run_dir).checkpoint(step), RunDir(run_dir).checkpoint(step, tmp=True)
    tmp = tmp.with_name(f"{tmp.name}.{process_tag()}")
    error = ""
    if acc.is_main_process:
        state = {
            "format": FORMAT, "step": step, "world_size": acc.num_processes, "meta": meta,
            "ema": None if ema is None else {"decay": ema.decay, "num_updates": ema.updates},
            "scaler": scaler_state, "engine": engine_counters(model),
        }  # fmt: skip
        files = {MODEL_FILE: save(weights), OPTIMIZER_FILE: save(optimizer_tensors)}
        if ema is not None:
            files[EMA_FILE] = save({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
        files |= {OPTIMIZER_META: _json(optimizer_meta), STATE_FILE: _json(state)}
        try:
            _write(tmp, files, step, acc.num_processes)
            replace_dir(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            error = _write_error(exc, tmp, sum(len(data) for data in files.values()))
        else:
            for _, old in complete_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    if _any_rank(acc, bool(error)):
        raise CheckpointWriteError(error or f"cannot write checkpoint {tmp} (rank 0 reports why)")
    return final


def load_checkpoint(
    acc: Accelerator,
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: AveragedWeights | None,
) -> Checkpoint:
    """Restore weights, optimizer, EMA and DeepSpeed's counters in place on any world size; the
    caller restores the rest from `.meta` and `.scaler_state`."""
    read_marker(path)
    state = read_json(path / STATE_FILE)
    weights = read_tensors(path / MODEL_FILE)
    load_weights(acc, model, weights, path / MODEL_FILE)
    optimizer_tensors = read_tensors(path / OPTIMIZER_FILE)
    optimizer_meta = read_json(path / OPTIMIZER_META)
    load_optimizer_state(acc, model, optimizer, optimizer_tensors, optimizer_meta, path / OPTIMIZER_FILE)
    if ema is not None:
        if state.get("ema") is not None:  # else the run starts keeping an EMA now, from these weights
            weights, updates = read_tensors(path / EMA_FILE), state["ema"]["num_updates"]
        else:
            updates = 0
        check_tensors(ema.state_dict(), weights, path / EMA_FILE)
        ema.load_state_dict(weights, updates)
    restore_engine_counters(model, state.get("engine"))
    return Checkpoint(path, state["step"], state["world_size"], state["meta"], state.get("scaler"))
