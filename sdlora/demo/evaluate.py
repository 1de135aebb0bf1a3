"""Read a 64x64 shape image back: foreground colour, shape and texture from measurable features.

Used to score what the demo model draws, so it must not be a learned model: every
decision is a threshold on a feature a person can check (see `Features`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

# Hue angles (degrees) of the colour names the evaluator can answer.
HUES = {"red": 0.0, "yellow": 60.0, "green": 120.0, "cyan": 180.0, "blue": 240.0, "magenta": 300.0}
MIN_AREA = 20  # fewer foreground pixels than this: nothing was drawn


@dataclass(frozen=True)
class Features:
    """Measurements of the largest foreground blob."""

    area: int  # foreground pixels
    fill: float  # area / bounding-box area: square ~1, circle ~0.79, triangle ~0.5
    solidity: float  # area / convex-hull area: ~1 for convex shapes, ~0.5 for a star
    top_heavy: float  # width of the upper third / width of the lower third: heart > 1 > triangle
    mean_rgb: tuple[float, float, float]
    chroma: float  # mean of max-min channel over the blob; low means no hue
    hue: float  # chroma-weighted circular mean hue, degrees
    stripe_score: float  # share of luminance variance explained by rows or by columns
    contrast: float  # luminance spread inside the blob
    points: int = 0  # tips of the outline around the centroid: 5 for a star, 3 for a triangle


@dataclass(frozen=True)
class Reading:
    """What the evaluator sees in an image."""

    colour: str
    shape: str
    texture: str
    features: Features | None


def background_colour(image: np.ndarray) -> np.ndarray:
    """Median colour of the one-pixel border."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return np.median(border, axis=0)


def _otsu(values: np.ndarray) -> float:
    """Threshold splitting values into two groups with the largest between-group variance."""
    hist, edges = np.histogram(values, bins=64)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist)
    total = weight[-1]
    cum_mean = np.cumsum(hist * centres)
    w0, w1 = weight[:-1], total - weight[:-1]
    valid = (w0 > 0) & (w1 > 0)
    m0 = np.where(valid, cum_mean[:-1] / np.maximum(w0, 1), 0)
    m1 = np.where(valid, (cum_mean[-1] - cum_mean[:-1]) / np.maximum(w1, 1), 0)
    between = np.where(valid, w0 * w1 * (m0 - m1) ** 2, -1)
    return float(edges[1:][:-1][int(np.argmax(between))])


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected labels of a boolean mask (0 = unlabelled)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    count = 0
    height, width = mask.shape
    for y, x in zip(*np.nonzero(mask), strict=True):
        if labels[y, x]:
            continue
        count += 1
        labels[y, x] = count
        queue = deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = count
                    queue.append((ny, nx))
    return labels, count


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """The largest blob of pixels far from the background colour, with holes filled."""
    distance = np.linalg.norm(image - background_colour(image), axis=2)
    mask = distance > max(40.0, _otsu(distance))
    labels, count = _components(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    blob = labels == 1 + int(np.argmax(sizes))
    outside, _ = _components(~blob)
    edge_labels = set(np.unique(np.concatenate([outside[0], outside[-1], outside[:, 0], outside[:, -1]])))
    holes = ~blob & ~np.isin(outside, list(edge_labels))
    return blob | holes


def _hull_area(mask: np.ndarray) -> float:
    """Convex-hull area of the pixel squares, by the monotone-chain algorithm."""
    ys, xs = np.nonzero(mask)
    points = set()
    for y in np.unique(ys):
        row = xs[ys == y]
        for x in (row.min(), row.max() + 1):
            points.update({(float(x), float(y)), (float(x), float(y + 1))})
    pts = sorted(points)

    def half(seq: list) -> list:
        chain: list = []
        for p in seq:
            while len(chain) >= 2 and _cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
        return chain

    hull = half(pts)[:-1] + half(pts[::-1])[:-1]
    return 0.5 * abs(sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(hull, hull[1:] + hull[:1], strict=True)))


ANGLE_BINS = 72


def _points(mask: np.ndarray) -> int:
    """Tips of the outline: peaks of the distance from the centroid, taken around the full circle.

    Every clean star has five; a shape torn into a bar and a stem (what a half-learned star
    often looks like) has two to four, so low solidity alone does not make a star.
    """
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    angles = ((np.degrees(np.arctan2(ys - cy, xs - cx)) + 360) % 360 * ANGLE_BINS / 360).astype(int)
    radius = np.zeros(ANGLE_BINS)
    np.maximum.at(radius, angles % ANGLE_BINS, np.hypot(ys - cy, xs - cx))
    radius = np.convolve(np.tile(radius, 3), np.ones(3) / 3, mode="same")[ANGLE_BINS : 2 * ANGLE_BINS]
    threshold = radius.min() + 0.3 * (radius.max() - radius.min())
    peaks = 0
    for i in range(ANGLE_BINS):
        window = radius[[(i + k) % ANGLE_BINS for k in range(-4, 5)]]
        if radius[i] > threshold and radius[i] == window.max() and radius[i] > radius[(i - 1) % ANGLE_BINS]:
            peaks += 1
    return peaks


def _cross(o: tuple, a: tuple, b: tuple) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _colour_features(pixels: np.ndarray) -> tuple[float, float]:
    high, low = pixels.max(axis=1), pixels.min(axis=1)
    chroma = high - low
    r, g, b = pixels[:, 0], pixels[:, 1], pixels[:, 2]
    # Hue as an angle on the colour hexagon; weighting by chroma ignores grey pixels.
    angle = np.arctan2(math.sqrt(3) * (g - b), 2 * r - g - b)
    hue = math.degrees(math.atan2((chroma * np.sin(angle)).sum(), (chroma * np.cos(angle)).sum())) % 360
    return float(chroma.mean()), hue


def _texture_features(image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    if inner.sum() < 10:
        return 0.0, 0.0
    luma = image @ np.array([0.299, 0.587, 0.114])
    values = luma[inner]
    total = values.var() + 1e-6
    ys, xs = np.nonzero(inner)
    explained = []
    for coords in (ys, xs):
        means = np.bincount(coords, weights=values) / np.maximum(np.bincount(coords), 1)
        explained.append(((means[coords] - values.mean()) ** 2).mean() / total)
    return float(max(explained)), float(values.std())


def measure(image: np.ndarray) -> Features | None:
    """Features of the main foreground blob, or None if nothing stands out from the background."""
    image = np.asarray(image, dtype=np.float64)[..., :3]
    mask = foreground_mask(image)
    area = int(mask.sum())
    if area < MIN_AREA:
        return None
    ys, xs = np.nonzero(mask)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    height = bottom - top
    widths = mask[top:bottom].sum(axis=1)
    third = max(1, height // 3)
    top_heavy = float(widths[:third].mean() / max(widths[-third:].mean(), 1))
    chroma, hue = _colour_features(image[mask])
    stripe_score, contrast = _texture_features(image, mask)
    return Features(
        area=area,
        fill=area / (height * (right - left)),
        solidity=area / max(_hull_area(mask), 1),
        top_heavy=top_heavy,
        mean_rgb=tuple(float(v) for v in image[mask].mean(axis=0)),
        chroma=chroma,
        hue=hue,
        stripe_score=stripe_score,
        contrast=contrast,
        points=_points(mask),
    )


def colour_name(f: Features) -> str:
    """Nearest named hue; white, black or gray when the blob has little chroma."""
    if f.chroma < 40:
        value = max(f.mean_rgb)
        return "white" if value > 190 else "black" if value < 70 else "gray"
    return min(HUES, key=lambda name: abs((f.hue - HUES[name] + 180) % 360 - 180))


def shape_name(f: Features) -> str:
    """Star, square, triangle, heart or circle from fill, solidity, points and top-heaviness."""
    if f.solidity < 0.75 and f.points == 5:
        return "star"
    if f.fill > 0.9:
        return "square"
    if f.top_heavy < 0.6:
        return "triangle"
    if f.top_heavy > 1.6:
        return "heart"
    return "circle"


def texture_name(f: Features) -> str:
    """Plain, striped (luminance follows rows or columns) or checkered."""
    if f.contrast < 12:
        return "plain"
    return "striped" if f.stripe_score > 0.5 else "checkered"


def classify(image: np.ndarray) -> Reading:
    """Colour, shape and texture of an RGB image (HxWx3, 0-255)."""
    f = measure(image)
    if f is None:
        return Reading("none", "none", "none", None)
    return Reading(colour_name(f), shape_name(f), texture_name(f), f)
