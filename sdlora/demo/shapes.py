"""Procedural 64x64 shape images with captions: the demo model's only data source.

Every image is a pure function of (seed, index), so a build can be repeated or
resumed without storing a dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4  # draw large, then downsample: anti-aliased edges like real photos

BASE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 20),
}
# Colours the base model never sees; a LoRA must teach them.
NEW_COLOURS: dict[str, tuple[int, int, int]] = {
    "magenta": (220, 40, 210),
    "cyan": (30, 200, 220),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
BASE_SHAPES = ("circle", "square", "triangle")
NEW_SHAPES = ("star", "heart")
TEXTURES = ("plain", "striped", "checkered")
TEXTURE_INK = (20, 20, 20)  # the second colour of striped and checkered fills


@dataclass(frozen=True)
class Scene:
    """One image's content; `render` turns it into pixels, `caption` into words."""

    shape: str
    colour: str
    background: str
    rgb: tuple[int, int, int]
    bg_rgb: tuple[int, int, int]
    size: int  # bounding width in pixels
    cx: float
    cy: float
    texture: str = "plain"
    period: int = 8  # stripe or checker period in pixels
    vertical: bool = False  # stripe direction
    ink: tuple[int, int, int] = TEXTURE_INK

    def caption(self, long: bool = True) -> str:
        """'a red circle on a white background' (long) or 'a red circle' (short)."""
        words = ["a", self.colour]
        if self.texture != "plain":
            words.append(self.texture)
        words.append(self.shape)
        if long:
            words += ["on", "a", self.background, "background"]
        return " ".join(words)


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    noise = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(np.array(rgb) + noise, 0, 255))


def place(rng: np.random.Generator, size: int) -> tuple[float, float]:
    """A random centre that keeps a shape of this size fully inside the image."""
    half = size / 2 + 2
    return float(rng.uniform(half, SIZE - half)), float(rng.uniform(half, SIZE - half))


def make_scene(
    rng: np.random.Generator,
    shapes: tuple[str, ...] = BASE_SHAPES,
    colours: dict[str, tuple[int, int, int]] = BASE_COLOURS,
    backgrounds: dict[str, tuple[int, int, int]] = BACKGROUNDS,
    textures: tuple[str, ...] = ("plain",),
) -> Scene:
    """A random named scene drawn from the given vocabularies."""
    shape = str(rng.choice(shapes))
    colour = str(rng.choice(sorted(colours)))
    background = str(rng.choice(sorted(backgrounds)))
    texture = str(rng.choice(textures))
    size = int(rng.integers(20, 47))
    cx, cy = place(rng, size)
    return Scene(
        shape=shape,
        colour=colour,
        background=background,
        rgb=_jitter(rng, colours[colour], 12),
        bg_rgb=_jitter(rng, backgrounds[background], 8),
        size=size,
        cx=cx,
        cy=cy,
        texture=texture,
        period=int(rng.integers(6, 11)),
        vertical=bool(rng.integers(0, 2)),
    )


def base_scene(seed: int, index: int) -> Scene:
    """The base model's training distribution: base colours, shapes and backgrounds."""
    return make_scene(np.random.default_rng([seed, index]))


def wide_scene(seed: int, index: int) -> Scene:
    """Anything at all (any hue, shape, texture, background) so the VAE can draw LoRA concepts too."""
    rng = np.random.default_rng([seed, index, 1])
    scene = make_scene(rng, BASE_SHAPES + NEW_SHAPES, textures=TEXTURES)
    fg = tuple(int(v) for v in rng.integers(0, 256, size=3))
    bg = tuple(int(v) for v in rng.integers(0, 256, size=3))
    ink = tuple(int(v) for v in rng.integers(0, 256, size=3))
    kind = rng.random()
    if kind < 0.4:  # random colours everywhere
        return _replace(scene, rgb=fg, bg_rgb=bg, ink=ink)
    if kind < 0.7:  # random saturated hue on a named background
        return _replace(scene, rgb=_saturated(rng))
    return scene


def _saturated(rng: np.random.Generator) -> tuple[int, int, int]:
    hue = rng.uniform(0, 1)
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6
    rgb = 1 - np.clip(np.minimum(k, 4 - k), 0, 1)
    value, sat = rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)
    return tuple(int(v) for v in (value * (1 - sat * rgb)) * 255)


def _replace(scene: Scene, **changes) -> Scene:
    from dataclasses import replace

    return replace(scene, **changes)


def _outline(shape: str, cx: float, cy: float, size: float) -> list[tuple[float, float]] | None:
    """Polygon vertices for polygonal shapes; None for shapes drawn from circles."""
    r = size / 2
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.42
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + r * 0.1 + radius * math.sin(angle)))
        return points
    return None


def _draw_mask(scene: Scene) -> Image.Image:
    s = SUPERSAMPLE
    mask = Image.new("L", (SIZE * s, SIZE * s), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, size = scene.cx * s, scene.cy * s, scene.size * s
    r = size / 2
    polygon = _outline(scene.shape, cx, cy, size)
    if polygon is not None:
        draw.polygon(polygon, fill=255)
    elif scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif scene.shape == "heart":
        lobe = r * 0.52
        top = cy - r * 0.35
        for dx in (-lobe, lobe):
            draw.ellipse([cx + dx - lobe, top - lobe, cx + dx + lobe, top + lobe], fill=255)
        draw.polygon(
            [(cx - r * 0.99, top + lobe * 0.25), (cx + r * 0.99, top + lobe * 0.25), (cx, cy + r)], fill=255
        )
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return mask


def _fill(scene: Scene) -> np.ndarray:
    """Foreground colour per (supersampled) pixel: flat, striped or checkered."""
    n = SIZE * SUPERSAMPLE
    colour = np.array(scene.rgb, dtype=np.float32)
    if scene.texture == "plain":
        return np.broadcast_to(colour, (n, n, 3))
    coords = np.arange(n) // (scene.period * SUPERSAMPLE // 2)
    if scene.texture == "striped":
        band = coords[None, :] if scene.vertical else coords[:, None]
        ink = np.broadcast_to(band % 2 == 1, (n, n))
    elif scene.texture == "checkered":
        ink = (coords[:, None] + coords[None, :]) % 2 == 1
    else:
        raise ValueError(f"unknown texture {scene.texture!r}")
    return np.where(ink[..., None], np.array(scene.ink, dtype=np.float32), colour)


def render(scene: Scene) -> Image.Image:
    """Draw the scene as a 64x64 RGB image."""
    n = SIZE * SUPERSAMPLE
    alpha = np.asarray(_draw_mask(scene), dtype=np.float32)[..., None] / 255
    background = np.broadcast_to(np.array(scene.bg_rgb, dtype=np.float32), (n, n, 3))
    big = alpha * _fill(scene) + (1 - alpha) * background
    image = Image.fromarray(big.round().astype(np.uint8))
    return image.resize((SIZE, SIZE), Image.Resampling.BOX)
