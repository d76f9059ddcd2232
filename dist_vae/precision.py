"""`train.precision`'s names and the torch dtypes they stand for, written once."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype autocast runs in under `precision`; None for fp32 (no autocast)."""
    return None if precision == "fp32" else DTYPES[precision]
