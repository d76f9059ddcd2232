"""A trained model for Python use: `dist_vae.load(path)` on a run directory or an exported folder.

    import dist_vae
    vae = dist_vae.load("runs/debug")            # or an exported folder (`dist-vae export`)
    images = vae.sample(16, seed=0)              # uint8 [16, R, R, 3]
    mean, logvar = vae.encode(images)            # the posterior q(z | x)
    bpd = vae.bits_per_dim(images)               # -ELBO in bits/dim, one number per image

Inputs: PIL images, uint8 arrays (HWC, or a stack NHWC) or tensors in [-1, 1] ([3, H, W] or
[N, 3, H, W]); anything not at the model's resolution is brought to it by the shards' rule (shorter
side to R with Lanczos, centre crop: `data.encode.square_crop`). Image outputs are uint8 arrays
[N, R, R, 3] by default, `output="pil"` a list of PIL images, `output="tensor"` floats in [-1, 1]
[N, 3, R, R]. Randomness comes from `seed` alone: the same seed gives the same pictures as
`dist-vae sample` (rank 0's share) on the same weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from dist_vae.checkpoint import load_module_state, read_tensors
from dist_vae.data.encode import square_crop
from dist_vae.errors import DistVaeError
from dist_vae.files import to_uint8
from dist_vae.metrics.likelihood import importance_weighted_log_likelihood
from dist_vae.models import build_model, model_config_class
from dist_vae.models.logistic_mixture import bits_per_dim
from dist_vae.models.protocol import evaluating
from dist_vae.run_dir import load_run
from dist_vae.run_layout import RunDir
from dist_vae.sampling import markov_chain, prior_samples, reconstructions

__all__ = ["CONFIG_FILE", "FORMAT", "WEIGHTS_FILE", "ImageInputError", "PretrainedVAE", "load"]

# An exported folder, in the Hugging Face Hub's layout (dist_vae/export.py writes it).
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "dist-vae"
OUTPUTS = ("numpy", "pil", "tensor")


class ImageInputError(DistVaeError, ValueError):
    """Images `PretrainedVAE` cannot take: the message names what it expected."""


def model_config_dict(model_cfg: Any, resolution: int) -> dict[str, Any]:
    """What config.json holds: the model's configuration and the resolution it was trained at."""
    return {"format": FORMAT, "resolution": resolution, "model": asdict(model_cfg)}


def _model_config(document: dict[str, Any], source: Path) -> Any:
    if document.get("format") != FORMAT or not isinstance(document.get("model"), dict):
        raise DistVaeError(f"{source} is not a dist-vae {CONFIG_FILE} (no 'format': '{FORMAT}' and 'model')")
    cls = model_config_class(document["model"].get("kind", ""))
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), document["model"]))


class PretrainedVAE:
    """One trained model on one device, in eval mode; see the module doc for inputs and outputs."""

    def __init__(self, model: torch.nn.Module, model_cfg: Any, source: Path, step: int | None, ema: bool):
        self.model, self.config, self.source, self.step, self.ema = model, model_cfg, source, step, ema
        self.resolution: int = model.resolution
        self.kind: str = model_cfg.kind

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        return (f"PretrainedVAE({self.kind}, {self.resolution} px, step {self.step}, "
                f"{'EMA' if self.ema else 'trained'} weights, from {self.source})")  # fmt: skip

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(int(seed))

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, output: str = "numpy") -> Any:
        """n prior samples z ~ p(z), x ~ p(x | z) (a model generating in steps: its last step)."""
        if int(n) < 1:
            raise ImageInputError(f"n must be >= 1, got {n}")
        return self._out(prior_samples(self.model, int(n), self._generator(seed))[-1], output)

    @torch.no_grad()
    def encode(self, images: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The posterior q(z | x) of each image: its mean [N, latent_dim] and log-variance (None for a
        posterior that is not one diagonal Gaussian), float tensors on the CPU."""
        with evaluating(self.model):
            posterior = self.model.posterior(self.images(images))
        logvar = None if posterior.logvar is None else posterior.logvar.float().cpu()
        return posterior.mean.float().cpu(), logvar

    @torch.no_grad()
    def reconstruct(self, images: Any, seed: int = 0, output: str = "numpy") -> Any:
        """x ~ p(x | z) at each image's posterior mean."""
        return self._out(reconstructions(self.model, self.images(images), self._generator(seed))[-1], output)

    @torch.no_grad()
    def bits_per_dim(self, images: Any, samples: int = 1, seed: int = 0) -> np.ndarray:
        """-log p(x) in bits per sub-pixel for each image, float64 [N]: the ELBO for samples=1, the
        importance-weighted bound with `samples` posterior draws otherwise."""
        x = self.images(images)
        with evaluating(self.model):
            nats = -importance_weighted_log_likelihood(self.model, x, samples, self._generator(seed))
        return bits_per_dim(nats, x[0].numel()).double().cpu().numpy()

    @torch.no_grad()
    def chain(self, images: Any, steps: int, seed: int = 0, output: str = "numpy") -> list[Any]:
        """The Markov chain x_0 = images, z ~ q(z | x_k), x_{k+1} ~ p(x | z): [x_0, ..., x_steps], each
        in the `output` form (for the PixelVAE, whose decoder is a strong autoregressive model)."""
        if int(steps) < 0:
            raise ImageInputError(f"steps must be >= 0, got {steps}")
        chain = markov_chain(self.model, self.images(images), int(steps), self._generator(seed))
        return [self._out(x, output) for x in chain]

    def images(self, images: Any) -> torch.Tensor:
        """Any accepted input as one float batch [N, 3, R, R] in [-1, 1] on the model's device."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ImageInputError("no images: expected a PIL image, a uint8 array or a tensor, or a list")
        batch = torch.cat([self._one(item) for item in items])
        return batch.to(self.device)

    def _one(self, item: Any) -> torch.Tensor:
        side = self.resolution
        if isinstance(item, Image.Image):
            item = np.asarray(square_crop(item.convert("RGB"), side))
        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or item.ndim not in (3, 4) or item.shape[-1] != 3:
                raise ImageInputError(
                    f"an array must be uint8 with 3 channels last (H, W, 3) or (N, H, W, 3), got "
                    f"{item.dtype} {item.shape}"
                )
            stack = item[None] if item.ndim == 3 else item
            if stack.shape[1:3] != (side, side):
                stack = np.stack([np.asarray(square_crop(Image.fromarray(a), side)) for a in stack])
            return torch.from_numpy(stack.copy()).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        if isinstance(item, torch.Tensor):
            if not item.is_floating_point() or item.dim() not in (3, 4) or item.shape[-3] != 3:
                raise ImageInputError(
                    f"a tensor must be float with 3 channels first (3, H, W) or (N, 3, H, W) in [-1, 1], "
                    f"got {item.dtype} {tuple(item.shape)}"
                )
            batch = (item[None] if item.dim() == 3 else item).detach().float().cpu()
            if batch.numel() and (batch.min() < -1 or batch.max() > 1):
                raise ImageInputError(
                    f"a tensor must hold values in [-1, 1], got [{batch.min():.3f}, {batch.max():.3f}]"
                )
            if batch.shape[-2:] != (side, side):
                pixels = to_uint8(batch).permute(0, 2, 3, 1).numpy()
                return self._one(pixels)
            return batch
        raise ImageInputError(
            f"cannot read {type(item).__name__} as an image: expected a PIL image, a uint8 array "
            "(H, W, 3) or a float tensor (3, H, W) in [-1, 1]"
        )

    @staticmethod
    def _out(x: torch.Tensor, output: str) -> Any:
        if output not in OUTPUTS:
            raise ImageInputError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        if output == "tensor":
            return x.float().cpu()
        pixels = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(p) for p in pixels] if output == "pil" else pixels


def load(path: str | Path, device: str | torch.device = "cpu", ema: bool | None = True) -> PretrainedVAE:
    """The model of a run directory (its newest verified checkpoint; `ema`: its EMA weights, False the
    trained ones, None EMA when kept) or of an exported folder (which holds one set of weights)."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        document = json.loads((path / CONFIG_FILE).read_text())
        model_cfg = _model_config(document, path / CONFIG_FILE)
        model = build_model(model_cfg, int(document["resolution"]))
        tensors = read_tensors(path / WEIGHTS_FILE)
        own = model.state_dict()
        load_module_state(model, {k: v.to(own[k].dtype) if k in own else v for k, v in tensors.items()},
                          path / WEIGHTS_FILE)  # fmt: skip
        weights = document.get("weights", {})
        return PretrainedVAE(model.to(device).eval(), model_cfg, path, weights.get("step"),
                             bool(weights.get("ema", True)))  # fmt: skip
    if not RunDir(path).config.is_file():
        raise DistVaeError(
            f"{path} is neither a run directory (config.yaml and checkpoints/) nor an exported model "
            f"({CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    run = load_run(path, ema=ema, device=device)
    return PretrainedVAE(run.model, run.cfg.model, path, run.step, run.ema)
