"""Prompt adherence of demo images: does the picture show the colour (and shape) its caption names?

The detector (`pipelines.eval.detector`: the largest foreground component's core hue and best-matching
shape outline) judges each image; `score` compares its verdicts with the captions. Colour accuracy is THE
metric; chance is 1 / len(COLORS) (a guess among the palette). Shape accuracy is the second one; chance
1 / len(SHAPES).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.data.demo_data import COLORS, SHAPES, Scene
from pipelines.eval.detector import Detection, detect

__all__ = ["Detection", "Score", "detect", "score"]


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
        rows.append({"prompt": prompt, "color": got.color, "shape": got.shape, "match": round(got.match, 3),
                     "color_ok": got.color == want.color, "shape_ok": got.shape == want.shape})
    n = len(rows)
    return Score(color=sum(r["color_ok"] for r in rows) / n, shape=sum(r["shape_ok"] for r in rows) / n,
                 images=n), rows
