"""Drawing a bedroom from its factors: a box room in one-point perspective, flat-shaded faces.

Geometry is drawn with Pillow polygons on a canvas `SUPERSAMPLE`-times larger than the output and
reduced with a box filter (exact antialiasing); light falloff, the lamp's glow and a little pixel
noise are added at the output size. Arrays see only + - * / and sqrt, which IEEE-754 rounds the same
everywhere, so a scene's bytes do not depend on the machine's libm or SIMD width.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

ROOM_HEIGHT, ROOM_DEPTH, CAMERA_Y, FOCAL, LENS_SHIFT = 1.5, 2.6, 1.0, 1.15, 0.33
NEAR = 0.05  # walls, floor and ceiling run from the back wall to this distance in front of the camera
BEDDING = {"cream": (225, 215, 190), "red": (170, 45, 50), "navy": (45, 60, 120), "green": (60, 120, 70)}
WOOD_LIGHT, WOOD_DARK = np.array([200, 160, 110]), np.array([95, 60, 35])
Colour = tuple[int, int, int]
Point3 = tuple[float, float, float]  # x (room width, -1..1), y (height), z (distance from back wall)


def hsv(h: float, s: float, v: float) -> Colour:
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


class Canvas:
    """The supersampled picture with the camera and light of one scene."""

    def __init__(self, size: int, camera_x: float, light_x: float) -> None:
        self.size, self.camera_x = size, camera_x
        self.image = Image.new("RGB", (size, size))
        self.draw = ImageDraw.Draw(self.image, "RGBA")  # RGBA fills blend: shadows
        norm = math.sqrt(light_x * light_x + 1.0 + 0.5)
        self.light = (light_x / norm, 1.0 / norm, math.sqrt(0.5) / norm)  # towards the light
        self._lambert: dict[tuple[Point3, float], float] = {}

    def project(self, p: Point3) -> tuple[float, float]:
        """Pixel coordinates of a room point (the camera looks at the back wall, lens shifted down)."""
        d = max(ROOM_DEPTH - p[2], NEAR)
        u = FOCAL * (p[0] - self.camera_x) / d
        v = FOCAL * (p[1] - CAMERA_Y) / d + LENS_SHIFT
        return (u + 1.0) * 0.5 * self.size, (1.0 - v) * 0.5 * self.size

    def shade(self, colour: Sequence[float], normal: Point3, ambient: float = 0.55) -> Colour:
        """Lambert shading of a flat face: ambient + diffuse towards the light."""
        k = self._lambert.get((normal, ambient))
        if k is None:
            lit = max(0.0, sum(n * li for n, li in zip(normal, self.light, strict=True)))
            k = self._lambert[normal, ambient] = ambient + (1.0 - ambient) * lit * 1.15
        return tuple(min(255, int(c * k + 0.5)) for c in colour)  # type: ignore[return-value]

    def poly(self, points: Sequence[Point3], fill: Colour) -> None:
        self.draw.polygon([self.project(p) for p in points], fill=fill)

    def line(self, a: Point3, b: Point3, fill: Colour, width: float) -> None:
        self.draw.line([self.project(a), self.project(b)], fill=fill, width=max(1, round(width * self.size)))

    def box(self, x0: float, x1: float, y0: float, y1: float, z0: float, z1: float, colour: Colour) -> None:
        """The faces of an axis-aligned box that the camera sees: front, top if below it, one side."""
        if y1 < CAMERA_Y:
            self.poly([(x0, y1, z0), (x1, y1, z0), (x1, y1, z1), (x0, y1, z1)], self.shade(colour, (0, 1, 0)))
        if x0 > self.camera_x:
            self.poly(
                [(x0, y0, z0), (x0, y1, z0), (x0, y1, z1), (x0, y0, z1)], self.shade(colour, (-1, 0, 0))
            )
        if x1 < self.camera_x:
            self.poly([(x1, y0, z0), (x1, y1, z0), (x1, y1, z1), (x1, y0, z1)], self.shade(colour, (1, 0, 0)))
        self.poly([(x0, y0, z1), (x1, y0, z1), (x1, y1, z1), (x0, y1, z1)], self.shade(colour, (0, 0, 1)))

    def wall_rect(self, wall: str, a0: float, a1: float, y0: float, y1: float, fill: Colour) -> None:
        """A rectangle on a wall: `a` runs along x on the back wall, along z (depth) on a side wall."""
        if wall == "back":
            self.poly([(a0, y0, 0.0), (a1, y0, 0.0), (a1, y1, 0.0), (a0, y1, 0.0)], fill)
        else:
            x = -1.0 if wall == "left" else 1.0
            self.poly([(x, y0, a0), (x, y0, a1), (x, y1, a1), (x, y1, a0)], fill)


def _room(c: Canvas, f: Mapping[str, Any], rng: np.random.Generator) -> None:
    """Walls with wallpaper stripes, ceiling, and a floor of planks with grain."""
    h, far, near = ROOM_HEIGHT, 0.0, ROOM_DEPTH
    wall = hsv(f["wall_hue"], 0.32, 0.86)
    stripe = hsv(f["wall_hue"], 0.40, 0.80)
    c.poly(
        [(-1, h, far), (1, h, far), (1, h, near), (-1, h, near)], c.shade((235, 232, 225), (0, -1, 0), 0.8)
    )
    walls = {"back": (0, 0, 1), "left": (1, 0, 0), "right": (-1, 0, 0)}
    for name, normal in walls.items():
        span = (-1.0, 1.0) if name == "back" else (far, near)
        c.wall_rect(name, *span, 0.0, h, c.shade(wall, normal))
        steps = 14 if name == "back" else 18
        for i in range(0, steps, 2):
            a0 = span[0] + (span[1] - span[0]) * i / steps
            a1 = span[0] + (span[1] - span[0]) * (i + 0.35) / steps
            c.wall_rect(name, a0, a1, 0.0, h, c.shade(stripe, normal))
    wood = (WOOD_LIGHT + (WOOD_DARK - WOOD_LIGHT) * f["floor_tone"]).tolist()
    planks = 12
    tones = (1.0 + 0.09 * rng.uniform(-1.0, 1.0, planks)).tolist()
    grain = rng.uniform(0.15, 0.85, (planks, 2)).tolist()
    up = (0, 1, 0)
    for i in range(planks):
        x0, x1 = -1.0 + 2.0 * i / planks, -1.0 + 2.0 * (i + 1) / planks
        c.poly(
            [(x0, 0, far), (x1, 0, far), (x1, 0, near), (x0, 0, near)],
            c.shade([w * tones[i] for w in wood], up),
        )
        for g in grain[i]:
            x = x0 + (x1 - x0) * g
            c.line((x, 0, far), (x, 0, near), c.shade([w * tones[i] * 0.88 for w in wood], up), 0.002)
        c.line((x0, 0, far), (x0, 0, near), c.shade([w * 0.6 for w in wood], up), 0.003)


def _window(c: Canvas, side: str, toward: float) -> None:
    """A white-framed window with sky and a cross bar, on the back wall or a side wall."""
    if side == "back":
        a0, a1 = (0.35, 0.85) if toward > 0 else (-0.85, -0.35)
    else:
        a0, a1 = 0.3, 1.1
    y0, y1 = 0.6, 1.25
    normal = {"back": (0, 0, 1), "left": (1, 0, 0), "right": (-1, 0, 0)}[side]
    c.wall_rect(side, a0, a1, y0, y1, c.shade((245, 245, 240), normal, 0.8))
    m = 0.04
    c.wall_rect(side, a0 + m, a1 - m, y0 + m, (y0 + y1) / 2 - 0.01, (150, 195, 235))
    c.wall_rect(side, a0 + m, a1 - m, (y0 + y1) / 2 + 0.01, y1 - m, (120, 170, 225))
    c.wall_rect(side, (a0 + a1) / 2 - 0.012, (a0 + a1) / 2 + 0.012, y0 + m, y1 - m, (245, 245, 240))


def _bed(c: Canvas, f: Mapping[str, Any]) -> None:
    x, w = f["bed_x"], f["bed_width"]
    x0, x1 = x - w / 2, x + w / 2
    wood = tuple(WOOD_DARK * 0.9 + WOOD_LIGHT * 0.1)
    c.box(x0 - 0.02, x1 + 0.02, 0.0, 0.8, 0.0, 0.07, wood)  # headboard
    c.box(x0, x1, 0.0, 0.22, 0.07, 1.2, wood)  # frame
    c.box(x0, x1, 0.22, 0.4, 0.07, 0.5, (235, 235, 230))  # sheet
    for p0, p1 in ((x0 + 0.05, x - 0.02), (x + 0.02, x1 - 0.05)):
        c.box(p0, p1, 0.4, 0.5, 0.12, 0.35, (245, 242, 235))  # pillows
    c.box(x0 - 0.015, x1 + 0.015, 0.15, 0.43, 0.5, 1.22, BEDDING[f["bedding"]])  # blanket


def render_geometry(
    f: Mapping[str, Any], size: int, rng: np.random.Generator
) -> tuple[Image.Image, tuple[float, float]]:
    """The supersampled scene, and the lamp shade's pixel position (for the glow added later)."""
    c = Canvas(size, f["camera_x"], f["light_x"])
    _room(c, f, rng)
    side = 1.0 if f["bed_x"] <= 0 else -1.0  # the nightstand, wardrobe and a back window go here
    _window(c, f["window_side"], side)
    bed_x, bed_w = f["bed_x"], f["bed_width"]
    if f["extra"] == "picture":
        frame, art = c.shade((60, 45, 35), (0, 0, 1)), hsv((f["wall_hue"] + 0.5) % 1.0, 0.5, 0.7)
        c.wall_rect("back", bed_x - bed_w * 0.25, bed_x + bed_w * 0.25, 0.95, 1.3, frame)
        c.wall_rect("back", bed_x - bed_w * 0.25 + 0.03, bed_x + bed_w * 0.25 - 0.03, 0.98, 1.27, art)
    lx = -0.6 * f["light_x"]
    stand_x = bed_x + side * (bed_w / 2 + 0.22)
    boxes = [
        (bed_x - bed_w / 2, bed_x + bed_w / 2, 0.45, 0.0, 1.2),
        (stand_x - 0.15, stand_x + 0.15, 0.4, 0.0, 0.3),
    ]
    if f["extra"] == "wardrobe":
        boxes.append((min(side, side * 0.55), max(side, side * 0.55), 1.35, 1.0, 1.5))
    for x0, x1, hgt, z0, z1 in boxes:
        corners = [(min(x0, x0 + lx * hgt), 0.0, z0), (max(x1, x1 + lx * hgt), 0.0, z0)]
        corners += [(max(x1, x1 + lx * hgt), 0.0, z1), (min(x0, x0 + lx * hgt), 0.0, z1)]
        c.draw.polygon([c.project(p) for p in corners], fill=(20, 15, 10, 70))
    if f["extra"] == "wardrobe":
        x0, x1, _, z0, z1 = boxes[-1]
        c.box(x0, x1, 0.0, 1.35, z0, z1, tuple(WOOD_DARK * 1.2))
        inner = x0 if side > 0 else x1
        c.line((inner, 0.1, (z0 + z1) / 2), (inner, 1.25, (z0 + z1) / 2), (40, 25, 15), 0.004)
    _bed(c, f)
    c.box(stand_x - 0.15, stand_x + 0.15, 0.0, 0.4, 0.0, 0.3, tuple(WOOD_LIGHT * 0.85))
    c.line((stand_x - 0.1, 0.3, 0.3), (stand_x + 0.1, 0.3, 0.3), (60, 40, 25), 0.004)
    c.box(stand_x - 0.02, stand_x + 0.02, 0.4, 0.58, 0.13, 0.17, (90, 90, 95))
    on = f["lamp_on"] == "on"
    c.box(stand_x - 0.09, stand_x + 0.09, 0.56, 0.74, 0.06, 0.24, (255, 235, 170) if on else (200, 190, 165))
    return c.image, c.project((stand_x, 0.66, 0.24))


def finish(
    image: Image.Image, f: Mapping[str, Any], lamp: tuple[float, float], scale: int, rng: np.random.Generator
) -> np.ndarray:
    """Reduce to the output size; add light falloff, the lamp's glow and mild noise; uint8 HWC."""
    small = image.reduce(scale) if scale > 1 else image
    res = small.size[0]
    a = np.asarray(small, dtype=np.float32)
    u = (np.arange(res, dtype=np.float32) + 0.5) / res * 2.0 - 1.0
    a *= (1.0 + 0.12 * float(f["light_x"]) * u)[None, :, None]
    if f["lamp_on"] == "on":
        dx = (u - (lamp[0] / image.size[0] * 2.0 - 1.0)) / 0.45
        dy = (u - (lamp[1] / image.size[1] * 2.0 - 1.0)) / 0.45
        q = 1.0 / (1.0 + dy[:, None] ** 2 + dx[None, :] ** 2)
        a += (q * q)[..., None] * np.array([90.0, 70.0, 30.0], dtype=np.float32)
    a += rng.standard_normal((res, res, 1), dtype=np.float32) * 3.5
    return np.clip(a + 0.5, 0, 255).astype(np.uint8)
