"""The demo's colour/shape detector: which palette colour and which shape the one drawn shape of an image has.

Built to read generated images as a person does, not only the clean training images:
1. background = the per-channel median of the image's 2 px border (a tinted or noisy background included);
2. foreground = pixels whose RGB distance to it is above an adaptive cut: Otsu's threshold on that distance,
   at least MIN_DISTANCE (so a plain or noisy image has none). A faint halo around the shape or a soft edge
   falls on the background's side of the cut;
3. the shape = the largest connected foreground component, its holes filled (a stray blob, a speck of noise
   or a darker stripe inside a square does not count);
4. colour = the palette colour nearest in hue to the per-channel median of the component's core (the
   component eroded by CORE_ERODE px, so edge pixels blended with the background do not vote). Hue, because
   demo backgrounds are achromatic: blending with white, grey or black changes brightness, not hue;
5. shape = the demo shape (circle, square, upright isosceles triangle) that, at the component's area, on its
   centroid and at its best rotation, covers most of it (`overlaps`). Whole outlines are compared, so the
   rounded corners and lumpy edges of generated shapes move all three overlaps alike, and only the
   component is measured, so a halo or a tinted background cannot stretch it. A bounding box's fill (the
   previous rule) read rounded squares as circles and halo-stretched circles as triangles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipelines.data.demo_data import COLORS

MIN_DISTANCE = 40.0  # the least RGB distance from the background that may count as foreground
MIN_FOREGROUND = 0.01  # share of the pixels below which nothing was drawn
MIN_CHROMA = 40  # max - min channel of the core's median below which it is grey, not a colour
CORE_ERODE = 1  # px peeled off the component before its colour is read (its blended edge)


@dataclass(frozen=True)
class Detection:
    color: str | None  # None: no coloured foreground
    shape: str | None
    match: float  # intersection over union of the component and the detected shape (0 without foreground)


def hue(rgb: np.ndarray) -> np.ndarray:
    """Hue angle in degrees [0, 360) of (..., 3) RGB values: 0 red, 60 yellow, 120 green, 180 cyan, ...
    (the smooth atan2 form of HSV hue). Adding grey to a colour (any (g, g, g)) leaves it unchanged."""
    rgb = np.asarray(rgb, dtype=np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360  # hexagonal hue, smooth form


PALETTE_HUES = {name: float(hue(np.array(rgb))) for name, rgb in COLORS.items()}


def nearest_color(rgb: np.ndarray) -> str | None:
    """The palette colour nearest in hue; None for a grey (chroma below MIN_CHROMA)."""
    if np.ptp(rgb) < MIN_CHROMA:
        return None
    h = float(hue(rgb))
    return min(PALETTE_HUES, key=lambda name: abs((h - PALETTE_HUES[name] + 180) % 360 - 180))


def otsu(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold of a 1-D sample: the cut maximising the between-class variance."""
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)[:-1]  # pixels at or below each cut
    w1 = counts.sum() - w0
    s0 = np.cumsum(counts * centres)[:-1]
    m0, m1 = s0 / np.maximum(w0, 1), (s0[-1] + counts[-1] * centres[-1] - s0) / np.maximum(w1, 1)
    return float(edges[1:-1][np.argmax(w0 * w1 * (m0 - m1) ** 2)])


def foreground(pixels: np.ndarray) -> np.ndarray:
    """(H, W) bool: the largest connected component of the pixels far from the border colour, holes filled."""
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    distance = np.linalg.norm(pixels - np.median(border, axis=0), axis=-1)  # (H, W)
    mask = distance > max(otsu(distance.ravel()), MIN_DISTANCE)
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    largest = 1 + int(np.argmax(ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))))
    return ndimage.binary_fill_holes(labels == largest)


# The demo's shapes as polygons centred on their centroid (x right, y down), with the rotations
# that give every distinct pose: a square repeats every 90 degrees, the upright isosceles triangle (base =
# height, as demo_data draws it) only every 360.
TEMPLATES = {"square": (np.array([[-.5, -.5], [.5, -.5], [.5, .5], [-.5, .5]]), 90),
             "triangle": (np.array([[0, -2 / 3], [.5, 1 / 3], [-.5, 1 / 3]]), 360)}
ANGLE_STEP = 5  # degrees between the poses tried


def _gauge(polygon: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The scale at which a convex polygon around the origin (vertices clockwise on screen, y down) first
    contains each point (x, y): the point is inside the polygon scaled by t exactly when gauge <= t."""
    gauge = np.zeros(x.shape)
    for (ax, ay), (bx, by) in zip(polygon, np.roll(polygon, -1, axis=0)):
        nx, ny = by - ay, ax - bx  # the edge's outward normal
        gauge = np.maximum(gauge, (nx * x + ny * y) / (nx * ax + ny * ay))
    return gauge


def _best_iou(mask: np.ndarray, gauge: np.ndarray) -> float:
    """The best intersection over union of the mask with the shapes {gauge <= t}, over every scale t."""
    order = np.argsort(gauge, axis=None)
    inter = np.cumsum(mask.ravel()[order])  # mask pixels inside the k+1 pixels of smallest gauge
    return float(np.max(inter / (mask.sum() + np.arange(1, order.size + 1) - inter)))


def overlaps(mask: np.ndarray) -> dict[str, float]:
    """For each demo shape, its best intersection over union with the mask, centred on the mask's centroid,
    over every size and rotation: 1 for a perfect match. Whole outlines are compared, not a bounding box, so a
    square with rounded corners stays a square and a lumpy circle a circle."""
    ys, xs = np.nonzero(mask)
    yy, xx = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
    x, y = xx - xs.mean(), yy - ys.mean()
    result = {"circle": _best_iou(mask, np.hypot(x, y))}
    for name, (polygon, period) in TEMPLATES.items():
        angles = np.radians(np.arange(0, period, ANGLE_STEP))
        rotations = np.stack([np.cos(angles), np.sin(angles), -np.sin(angles), np.cos(angles)], 1).reshape(-1, 2, 2)
        result[name] = max(_best_iou(mask, _gauge(polygon @ rotation, x, y)) for rotation in rotations)
    return result


def detect(image) -> Detection:
    """Colour and shape of the one shape in a demo image (a PIL image or an (H, W, 3) uint8 array)."""
    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)
    mask = foreground(pixels)
    if mask.mean() < MIN_FOREGROUND:
        return Detection(color=None, shape=None, match=0.0)
    core = ndimage.binary_erosion(mask, iterations=CORE_ERODE)
    color = nearest_color(np.median(pixels[core if core.any() else mask], axis=0))
    scores = overlaps(mask)
    shape = max(scores, key=scores.get)
    return Detection(color=color, shape=shape, match=scores[shape])
