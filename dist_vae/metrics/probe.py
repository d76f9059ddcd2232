"""A factor probe: a small CNN trained on the scene generator's labels, to judge generated scenes.

It classifies each discrete factor and regresses each continuous one (scaled to [0, 1]). Its
penultimate layer is a feature space fitted to this data, for a "probe Fréchet distance" (not FID:
no Inception network is involved). Its predictions make "on the data manifold" a number: how sure
the probe is of the discrete factors, and how far an image lies from the scene re-rendered from the
factors the probe reads in it. Weights are cached beside the shards as safetensors + JSON.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load, save
from torch import nn

from dist_vae.data.decode import to_unit_range
from dist_vae.data.index import DataError
from dist_vae.data.scenes import FACTORS, read_labelled, render
from dist_vae.files import to_uint8, write_bytes_atomic, write_text_atomic

PROBE_DIR, WEIGHTS, META = "probe", "probe.safetensors", "probe.json"
DISCRETE = [f for f in FACTORS if f.discrete]
CONTINUOUS = [f for f in FACTORS if not f.discrete]


class FactorProbe(nn.Module):
    """Four convolutions (three strided) with batch norm, a linear feature layer, one linear head."""

    def __init__(self, resolution: int, width: int = 32, features: int = 128) -> None:
        super().__init__()
        self.resolution, self.width, self.num_features = resolution, width, features
        w = width
        self.convs = nn.Sequential(
            nn.Conv2d(3, w, 3, 2, 1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, 2, 1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, 2, 1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.Conv2d(4 * w, 4 * w, 3, 1, 1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(64 * w, features), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(features, sum(len(f.values) for f in DISCRETE) + len(CONTINUOUS))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [N, num_features] of images [N, 3, R, R] in [-1, 1]."""
        if x.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(f"the probe reads {self.resolution} px images, got {tuple(x.shape[-2:])}")
        return self.convs(x)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(logits per discrete factor, continuous factors scaled to [0, 1] [N, C])."""
        out = self.head(self.features(x))
        logits, start = [], 0
        for f in DISCRETE:
            logits.append(out[:, start : start + len(f.values)])
            start += len(f.values)
        return logits, out[:, start:]


def encode_targets(factors: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(class indices [N, D], continuous factors scaled to [0, 1] [N, C]) of factor dicts."""
    classes = [[f.values.index(d[f.name]) for f in DISCRETE] for d in factors]
    scaled = [[(d[f.name] - f.low) / (f.high - f.low) for f in CONTINUOUS] for d in factors]
    return torch.tensor(classes, dtype=torch.long), torch.tensor(scaled, dtype=torch.float32)


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, R, R, 3] -> float [N, 3, R, R] in [-1, 1]."""
    return to_unit_range(torch.from_numpy(images).permute(0, 3, 1, 2))


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, batch: int = 256) -> list[Any]:
    return [fn(x[i : i + batch]) for i in range(0, len(x), batch)]


@torch.no_grad()
def score(probe: FactorProbe, images: torch.Tensor, factors: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Held-out accuracy per discrete factor and R² per continuous factor."""
    probe.eval()
    outs = batched(probe, images)
    classes, scaled = encode_targets(factors)
    pred_scaled = torch.cat([o[1] for o in outs])
    report = {}
    for i, f in enumerate(DISCRETE):
        pred = torch.cat([o[0][i] for o in outs]).argmax(1)
        report[f"{f.name}/accuracy"] = (pred == classes[:, i]).float().mean().item()
    for i, f in enumerate(CONTINUOUS):
        report[f"{f.name}/r2"] = r_squared(pred_scaled[:, i], scaled[:, i])
    return report


def r_squared(pred: torch.Tensor, y: torch.Tensor) -> float:
    """1 - residual / total sum of squares: 1 exact, 0 no better than predicting the mean."""
    residual = (pred - y).square().sum()
    return (1.0 - residual / (y - y.mean()).square().sum().clamp_min(1e-12)).item()


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    width: int = 32
    seed: int = 0
    limit: int | None = None  # train on the first N train images only


def train_probe(
    directory: str | Path, settings: TrainSettings, log: Callable[[str], None] = print
) -> FactorProbe:
    """Train on the train split, score on val, cache weights + report in DIRECTORY/probe/."""
    directory = Path(directory)
    images, factors = read_labelled(directory, "train", settings.limit)
    val_images, val_factors = read_labelled(directory, "val")
    x, (classes, scaled) = to_input(images), encode_targets(factors)
    torch.manual_seed(settings.seed)
    probe = FactorProbe(images.shape[1], settings.width)
    opt = torch.optim.Adam(probe.parameters(), lr=settings.lr)
    steps = settings.epochs * -(-len(x) // settings.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(settings.seed)
    start = time.monotonic()
    for epoch in range(settings.epochs):
        probe.train()
        order, total = torch.randperm(len(x), generator=gen), 0.0
        for i in range(0, len(x), settings.batch_size):
            idx = order[i : i + settings.batch_size]
            logits, pred = probe(x[idx])
            loss = sum(F.cross_entropy(lg, classes[idx, j]) for j, lg in enumerate(logits))
            loss = loss + 10.0 * F.mse_loss(pred, scaled[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        seconds = time.monotonic() - start
        log(f"probe epoch {epoch + 1}/{settings.epochs}: loss {total / len(x):.4f} ({seconds:.0f} s)")
    report = score(probe, to_input(val_images), val_factors)
    save_probe(
        directory, probe, {"settings": asdict(settings), "train": len(x), "val": len(val_images), **report}
    )
    return probe


def save_probe(directory: Path, probe: FactorProbe, report: dict[str, Any]) -> None:
    """Weights first, then the JSON that names their sha256: a JSON present means a complete pair."""
    weights = save({k: v.contiguous() for k, v in probe.state_dict().items()})
    write_bytes_atomic(directory / PROBE_DIR / WEIGHTS, weights)
    meta = {
        "resolution": probe.resolution,
        "width": probe.width,
        "features": probe.num_features,
        "factors": [f.name for f in FACTORS],
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "report": report,
    }
    write_text_atomic(directory / PROBE_DIR / META, json.dumps(meta, indent=1) + "\n")


def load_probe(directory: str | Path) -> tuple[FactorProbe, dict[str, Any]]:
    """The cached probe of a shard directory (eval mode) and its report."""
    folder = Path(directory) / PROBE_DIR
    if not (folder / META).is_file():
        raise DataError(f"{folder / META} is missing: train the probe with tools/probe.py train {directory}")
    meta = json.loads((folder / META).read_text())
    weights = (folder / WEIGHTS).read_bytes()
    if hashlib.sha256(weights).hexdigest() != meta["weights_sha256"]:
        raise DataError(f"{folder / WEIGHTS} differs from its sha256 in {META}: train the probe again")
    if meta["factors"] != [f.name for f in FACTORS]:
        raise DataError(f"{folder / META} was trained on factors {meta['factors']}: train the probe again")
    probe = FactorProbe(meta["resolution"], meta["width"], meta["features"])
    probe.load_state_dict(load(weights))
    return probe.eval(), meta["report"]


@torch.no_grad()
def predict(probe: FactorProbe, images: torch.Tensor) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """The factors the probe reads in images [N, 3, R, R] in [-1, 1], and its confidence [N]: the
    mean over discrete factors of the top class probability (1 sure, 1/classes guessing)."""
    probe.eval()
    outs = batched(probe, images)
    probs = [torch.cat([o[0][i] for o in outs]).softmax(1) for i in range(len(DISCRETE))]
    scaled = torch.cat([o[1] for o in outs]).clamp(0.0, 1.0)
    factors = []
    for n in range(len(images)):
        d: dict[str, Any] = {
            f.name: f.values[int(p[n].argmax())] for f, p in zip(DISCRETE, probs, strict=True)
        }
        for i, f in enumerate(CONTINUOUS):
            d[f.name] = f.low + (f.high - f.low) * float(scaled[n, i])
        factors.append(d)
    return factors, torch.stack([p.max(1).values for p in probs]).mean(0)


def rerender(probe: FactorProbe, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scenes ([N, 3, R, R] in [-1, 1]) rendered from the factors the probe reads in images, and
    its confidence [N]: the exact geometry a generated image is judged against."""
    factors, confidence = predict(probe, images)
    return to_input(np.stack([render(f, probe.resolution) for f in factors])), confidence


def on_manifold(probe: FactorProbe, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: the probe's confidence, and the RMS pixel error (pixels in [0, 1]) between the
    image and the scene re-rendered from the factors the probe reads in it."""
    rerendered, confidence = rerender(probe, images)
    error = ((images.float() - rerendered) / 2.0).square().mean(dim=(1, 2, 3)).sqrt()
    return {"confidence": confidence, "render_error": error}


def probe_frechet_distance(probe: FactorProbe, real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between two image sets ([N, 3, R, R] in [-1, 1]) in the probe's features, the
    images first quantised as a PNG of them holds them (as FID's are)."""
    from dist_vae.metrics.fid import fid  # torchmetrics: the [metrics] extra

    probe.eval()

    def features(images: torch.Tensor) -> torch.Tensor:
        return torch.cat(batched(probe.features, to_unit_range(to_uint8(images)))).double()

    return fid(features(real), features(fake))


def probe_report(probe: FactorProbe, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """The probe's verdict on generated images against real ones: the probe Fréchet distance, and the
    mean on-manifold scores of both sets (the real set's are the scale the generated ones are read on)."""
    report = {"probe_fd": probe_frechet_distance(probe, real, fake)}
    for name, images in (("real", real), ("fake", fake)):
        for score_name, values in on_manifold(probe, images).items():
            report[f"{name}_{score_name}"] = values.mean().item()
    return report
