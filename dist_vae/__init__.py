"""dist-vae: distributed training of high-resolution VAEs (iterative injection, PixelCNN++ decoders).

`dist_vae.load(path)` gives a trained model for Python use (dist_vae/pretrained.py); it is imported on
first use, so `import dist_vae` stays light for the launchers and the signal handlers.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from dist_vae.pretrained import load

        return load
    raise AttributeError(f"module 'dist_vae' has no attribute {name!r}")
