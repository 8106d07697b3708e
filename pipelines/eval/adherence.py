"""Prompt adherence of demo images: does the picture show the color (and shape) its caption names?

The detector is deliberately simple, so its verdict is easy to trust:
1. background = the per-channel median of the image's 2 px border;
2. foreground = pixels farther than FOREGROUND_DISTANCE from it (Euclidean, 0-255 RGB);
3. color = the palette color nearest in hue to the foreground's per-channel median. Hue, because the
   demo backgrounds are achromatic: blending a shape's edge with white, grey or black changes its
   brightness and saturation but not its hue. Too small or too grey a foreground is "none" (a miss);
4. shape = from the share of the foreground's bounding box it fills: square 1.0, circle pi/4, triangle 1/2.

Color accuracy is THE metric; chance is 1 / len(COLORS) (a guess among the palette). Shape accuracy is
the second one; chance 1 / len(SHAPES).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.data.demo_data import COLORS, SHAPES, Scene

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that makes a pixel foreground
MIN_FOREGROUND = 0.01  # share of the pixels below which nothing was drawn
MIN_CHROMA = 40  # max - min channel of the foreground median below which it is grey, not a color
FILL_CUTS = ((0.64, "triangle"), (0.89, "circle"), (1.01, "square"))  # fill ratio -> shape, midpoints


@dataclass(frozen=True)
class Detection:
    color: str | None  # None: no colored foreground
    shape: str | None
    fill: float  # foreground share of its bounding box (0 without foreground)


def hue(rgb: np.ndarray) -> np.ndarray:
    """Hue angle in degrees [0, 360) of (..., 3) RGB values: 0 red, 60 yellow, 120 green, 180 cyan, ...
    (the smooth atan2 form of HSV hue). Adding grey to a color (any (g, g, g)) leaves it unchanged."""
    rgb = np.asarray(rgb, dtype=np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360  # hexagonal hue, smooth form


PALETTE_HUES = {name: float(hue(np.array(rgb))) for name, rgb in COLORS.items()}


def nearest_color(rgb: np.ndarray) -> str | None:
    """The palette color nearest in hue; None for a grey (chroma below MIN_CHROMA)."""
    if np.ptp(rgb) < MIN_CHROMA:
        return None
    h = float(hue(rgb))
    return min(PALETTE_HUES, key=lambda name: abs((h - PALETTE_HUES[name] + 180) % 360 - 180))


def detect(image) -> Detection:
    """Color and shape of the one shape in a demo image (a PIL image or an (H, W, 3) uint8 array)."""
    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    mask = np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE  # (H, W)
    if mask.mean() < MIN_FOREGROUND:
        return Detection(color=None, shape=None, fill=0.0)
    color = nearest_color(np.median(pixels[mask], axis=0))
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    fill = float(box.mean())
    shape = next(name for cut, name in FILL_CUTS if fill < cut)
    return Detection(color=color, shape=shape, fill=fill)


@dataclass(frozen=True)
class Score:
    color: float  # share of images whose detected color is the prompt's
    shape: float
    images: int

    @property
    def chance_color(self) -> float:
        return 1 / len(COLORS)

    @property
    def chance_shape(self) -> float:
        return 1 / len(SHAPES)


def score(images, prompts: list[str]) -> tuple[Score, list[dict]]:
    """Adherence of images[i] to prompts[i] (demo captions), and one result row per image."""
    if len(images) != len(prompts) or not images:
        raise ValueError(f"need one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    rows = []
    for image, prompt in zip(images, prompts):
        want, got = Scene.from_caption(prompt), detect(image)
        rows.append({"prompt": prompt, "color": got.color, "shape": got.shape, "fill": round(got.fill, 3),
                     "color_ok": got.color == want.color, "shape_ok": got.shape == want.shape})
    n = len(rows)
    return Score(color=sum(r["color_ok"] for r in rows) / n, shape=sum(r["shape_ok"] for r in rows) / n,
                 images=n), rows
