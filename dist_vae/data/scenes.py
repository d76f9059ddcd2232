"""Procedural bedrooms with known generative factors: an LSUN-shaped dataset small models can learn.

A scene is drawn from (seed, index) alone: its factors come from `np.random.default_rng([seed,
index])` (never a global RNG) and do not depend on the resolution, so any worker count, machine or
output size gives the same scene. `render(factors, resolution)` draws a scene from factors, which is
how a probe's predicted factors are turned back into a picture (the on-manifold score).
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dist_vae.data.index import DataError, read_manifest
from dist_vae.data.scene_render import finish, render_geometry
from dist_vae.data.sources import SourceError

KEY_PREFIX = "scene-"
MIN_RESOLUTION = 8
CANVAS = 192  # the supersampled canvas is at least this many pixels across


@dataclass(frozen=True)
class Factor:
    """One generative factor: continuous in [low, high] (regressed) or one of `values` (classified)."""

    name: str
    doc: str
    low: float = 0.0
    high: float = 1.0
    values: tuple[str, ...] = ()

    @property
    def discrete(self) -> bool:
        return bool(self.values)


FACTORS: tuple[Factor, ...] = (
    Factor("wall_hue", "hue of the walls and wallpaper stripes (0 red, 0.33 green, 0.67 blue)", 0.0, 0.8),
    Factor("floor_tone", "wooden floor, light oak (0) to dark walnut (1)", 0.0, 1.0),
    Factor("bed_x", "centre of the bed along the back wall (room spans -1..1)", -0.4, 0.4),
    Factor("bed_width", "width of the bed (room width 2)", 0.6, 1.0),
    Factor("light_x", "direction the light comes from: -1 left, 0 front, 1 right", -1.0, 1.0),
    Factor("camera_x", "camera offset across the room (moves the vanishing point)", -0.3, 0.3),
    Factor("window_side", "wall holding the window", values=("left", "back", "right")),
    Factor("lamp_on", "bedside lamp lit (a warm glow) or not", values=("off", "on")),
    Factor("bedding", "colour of the blanket", values=("cream", "red", "navy", "green")),
    Factor("extra", "third piece of furniture", values=("none", "picture", "wardrobe")),
)


def sample_factors(seed: int, index: int) -> dict[str, Any]:
    """The factors of scene `index`: continuous ones rounded to 4 decimals, discrete ones by name.

    Rounding makes the JSON in the shards the exact input of `render`, so a scene is rebuilt from it.
    """
    rng = np.random.default_rng([seed, index])
    out: dict[str, Any] = {}
    for factor in FACTORS:
        if factor.discrete:
            out[factor.name] = factor.values[int(rng.integers(len(factor.values)))]
        else:
            out[factor.name] = round(float(rng.uniform(factor.low, factor.high)), 4)
    return out


def check_factors(factors: Mapping[str, Any]) -> None:
    """Refuse factors `render` cannot draw, naming the first bad one."""
    for factor in FACTORS:
        value = factors.get(factor.name)
        ok = value in factor.values if factor.discrete else isinstance(value, int | float)
        if not ok:
            raise ValueError(f"scene factor {factor.name}={value!r}: expected {factor.values or 'a number'}")


def render(factors: Mapping[str, Any], resolution: int, texture: tuple[int, ...] = (0,)) -> np.ndarray:
    """A scene as uint8 [resolution, resolution, 3]; `texture` seeds the plank tones and pixel noise."""
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"scene resolution must be >= {MIN_RESOLUTION}, got {resolution}")
    check_factors(factors)
    scale = max(2, math.ceil(CANVAS / resolution))
    image, lamp = render_geometry(factors, resolution * scale, np.random.default_rng([*texture, 1]))
    return finish(image, factors, lamp, scale, np.random.default_rng([*texture, 2, resolution]))


def scene_key(index: int) -> str:
    return f"{KEY_PREFIX}{index:08d}"


class SceneSource:
    """`scenes:N[:SEED]`: N scenes rendered at the shard resolution, as PNG bytes like any source."""

    def __init__(self, n: int, seed: int, resolution: int) -> None:
        if n < 1 or resolution < MIN_RESOLUTION:
            raise SourceError(f"scenes need N >= 1 and resolution >= {MIN_RESOLUTION}, got {n}, {resolution}")
        self.n, self.seed, self.resolution = n, seed, resolution

    def keys(self) -> list[str]:
        return [scene_key(i) for i in range(self.n)]

    def _index(self, key: str) -> int:
        digits = key.removeprefix(KEY_PREFIX)
        if not (key.startswith(KEY_PREFIX) and digits.isdigit() and int(digits) < self.n):
            raise SourceError(f"no scene {key!r} among scenes:{self.n}:{self.seed}")
        return int(digits)

    def factors(self, key: str) -> dict[str, Any]:
        return sample_factors(self.seed, self._index(key))

    def read(self, key: str) -> bytes:
        index = self._index(key)
        pixels = render(sample_factors(self.seed, index), self.resolution, (self.seed, index))
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=0)
        return buf.getvalue()

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        for key in self.keys():
            yield key, self.read(key)


def parse_scene_spec(arg: str) -> tuple[int, int]:
    """(N, SEED) from the ARG of `scenes:N[:SEED]`."""
    parts = arg.split(":")
    if not (1 <= len(parts) <= 2 and all(p.isdigit() for p in parts) and int(parts[0]) >= 1):
        raise SourceError(
            f"bad --source scenes:{arg}: expected scenes:N or scenes:N:SEED (N >= 1, SEED >= 0)"
        )
    return int(parts[0]), int(parts[1]) if len(parts) == 2 else 0


def read_labelled(
    directory: str | Path, split: str, limit: int | None = None
) -> tuple[np.ndarray, list[dict]]:
    """The images (uint8 [N, R, R, 3]) and factors of a split of scene shards, in shard order."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if split not in manifest["splits"]:
        raise DataError(f"{directory}/manifest.json has no split {split!r}")
    images: list[np.ndarray] = []
    factors: list[dict] = []
    for shard in manifest["splits"][split]["shards"]:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(directory / shard["name"]) as tar:
            for member in tar:
                stem, _, ext = member.name.rpartition(".")
                members.setdefault(stem, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
        for stem, parts in members.items():
            meta = json.loads(parts.get("json", b"{}"))
            if "factors" not in meta:
                raise DataError(f"{directory / shard['name']}: {stem} has no factors: not made by scenes:N")
            image = next(v for k, v in parts.items() if k != "json")
            with Image.open(io.BytesIO(image)) as img:
                images.append(np.asarray(img.convert("RGB")))
            factors.append(meta["factors"])
            if len(images) == limit:
                return np.stack(images), factors
    if not images:
        raise DataError(f"{directory}: the {split} split holds no images")
    return np.stack(images), factors
