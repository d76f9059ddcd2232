"""Accelerate's undocumented attribute that the DeepSpeed update path relies on, in one place.

Supported: accelerate 1.x (the suite runs 1.16.0). Under DeepSpeed, `Accelerator.prepare` returns
the engine wrapped for Accelerate's own loop; the update path drives the engine itself, which it
reaches through `Accelerator.deepspeed_engine_wrapped`, an internal wrapper ("Internal wrapper for
deepspeed.runtime.engine.DeepSpeedEngine") whose `engine` field is the DeepSpeed engine. Both are
set in `__init__` (the first only when a DeepSpeed plugin is configured), so the installed classes
are checked by the names their `__init__` assigns.
"""

from __future__ import annotations

from typing import Any

from dist_vae.errors import BackendError

SUPPORTED = "1"


def _assigns(cls: type, name: str) -> bool:
    return name in cls.__init__.__code__.co_names


def check_supported(acc: Any | None = None) -> None:
    """BackendError naming the installed and supported versions when the installed Accelerator or
    its DeepSpeed wrapper no longer holds a name this module uses (or `acc`, when given, lacks it)."""
    import accelerate
    from accelerate.utils import DeepSpeedEngineWrapper

    wrapped = getattr(acc, "deepspeed_engine_wrapped", None)
    found = {
        "Accelerator.deepspeed_engine_wrapped": _assigns(accelerate.Accelerator, "deepspeed_engine_wrapped")
        and (acc is None or hasattr(acc, "deepspeed_engine_wrapped")),
        "DeepSpeedEngineWrapper.engine": _assigns(DeepSpeedEngineWrapper, "engine")
        and (wrapped is None or hasattr(wrapped, "engine")),
    }
    absent = [name for name, present in found.items() if not present]
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
