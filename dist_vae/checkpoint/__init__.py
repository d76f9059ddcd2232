"""Checkpoints as one component: the on-disk format (format.py), the world-size independent state
(state.py) and atomic save, load and rotation (store.py). The trainer and `run_dir.load_run` use
only the names below; the component imports nothing from the engine or the run directory.
"""

from dist_vae.checkpoint.format import (
    COMPLETE,
    EMA_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    OPTIMIZER_META,
    STATE_FILE,
    complete_checkpoints,
    load_module_state,
    newest_verified,
    read_json,
    read_tensors,
)
from dist_vae.checkpoint.state import raw_module, restore_scaler, scaler_state
from dist_vae.checkpoint.store import (
    CheckpointWriteError,
    check_resume,
    clean_partial,
    config_changes,
    config_dict,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from dist_vae.errors import CheckpointError

__all__ = [
    "COMPLETE",
    "EMA_FILE",
    "MODEL_FILE",
    "OPTIMIZER_FILE",
    "OPTIMIZER_META",
    "STATE_FILE",
    "CheckpointError",
    "CheckpointWriteError",
    "check_resume",
    "clean_partial",
    "complete_checkpoints",
    "config_changes",
    "config_dict",
    "load_checkpoint",
    "load_module_state",
    "newest_verified",
    "raw_module",
    "read_json",
    "read_tensors",
    "resolve_resume",
    "restore_scaler",
    "save_checkpoint",
    "scaler_state",
]
