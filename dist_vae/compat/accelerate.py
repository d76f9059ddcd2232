"""Accelerate's undocumented attribute that the DeepSpeed update path relies on, in one place.

Supported: accelerate 1.x (the suite runs 1.16.0). Under DeepSpeed, `Accelerator.prepare` returns
the engine wrapped for Accelerate's own loop; the update path drives the engine itself, which it
reaches through `Accelerator.deepspeed_engine_wrapped`, an internal wrapper ("Internal wrapper for
deepspeed.runtime.engine.DeepSpeedEngine") whose `engine` field is the DeepSpeed engine.
"""

from __future__ import annotations

from typing import Any

from dist_vae.errors import BackendError

SUPPORTED = "1"
ACCELERATOR_FIELDS = ("deepspeed_engine_wrapped",)


def check_supported(acc: Any) -> None:
    """BackendError naming the installed and supported versions when `acc` (an Accelerator, or the
    wrapper it holds once DeepSpeed is prepared) lacks a name this module uses."""
    import accelerate

    absent = [f"Accelerator.{name}" for name in ACCELERATOR_FIELDS if not hasattr(acc, name)]
    wrapped = getattr(acc, "deepspeed_engine_wrapped", None)
    if wrapped is not None and not hasattr(wrapped, "engine"):
        absent.append("DeepSpeedEngineWrapper.engine")
    if absent:
        raise BackendError(
            f"accelerate {accelerate.__version__} lacks {', '.join(absent)}, which "
            f"dist_vae/compat/accelerate.py uses; supported: accelerate {SUPPORTED}.x "
            f"(install accelerate=={SUPPORTED}.*)"
        )


def deepspeed_engine(acc: Any) -> Any:
    """The DeepSpeed engine that `acc.prepare` built."""
    check_supported(acc)
    return acc.deepspeed_engine_wrapped.engine
