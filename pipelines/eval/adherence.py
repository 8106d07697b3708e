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

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator

from pipelines.config import S3Options, StrictModel, TrackingOptions
from pipelines.data.demo_data import COLORS, SHAPES, Scene
from pipelines.eval.sampling import SampleConfig, run_sampling
from pipelines.tracking import EVALUATED_TAG, STAGE_EVALUATE, STAGE_TAG, StageRun

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


class EvaluateConfig(StrictModel):
    """jobs/evaluate.py: sample the held-out prompts from a checkpoint and score the images.

    The source is `checkpoint` or `run_id`, as for sampling. With `run_id` the scores go into that
    training run (so each stage's run holds its own adherence); with `checkpoint` into an `evaluate` run.
    """

    checkpoint: str | None = None  # checkpoint directory: local path or s3:// URI
    run_id: str | None = None  # MLflow training run: its `hdm.checkpoint`, and where the scores go
    prompt_file: str  # demo captions, one per line (the demo data's heldout.txt)
    seeds: list[int] = Field(default_factory=lambda: list(range(8)), min_length=1)
    width: int = 64
    height: int = 64
    steps: int = Field(16, ge=1)
    cfg: float = 3.0
    batch_size: int = Field(8, ge=1)  # seeds of one prompt per denoiser batch (images may differ by rounding)
    device: str | None = None  # None: cuda when available, else cpu
    out: str = "evaluation"  # local directory: the images, grid.png (rows = prompts) and adherence.json
    tracking: TrackingOptions = TrackingOptions()
    s3: S3Options = S3Options()

    @model_validator(mode="after")
    def _one_source(self) -> EvaluateConfig:
        if bool(self.checkpoint) == bool(self.run_id):
            raise ValueError("give exactly one of checkpoint, run_id")
        return self

    def prompts(self) -> list[str]:
        """The prompt file's lines (read when the job runs: a pipeline validates this config before the
        stage that writes the file has run)."""
        if not Path(self.prompt_file).is_file():
            raise FileNotFoundError(f"no prompt file at {self.prompt_file}")
        return [line.strip() for line in Path(self.prompt_file).read_text().splitlines() if line.strip()]


@dataclass
class EvaluationSummary:
    score: Score
    grid: str
    results: str
    run_id: str | None
    per_prompt: dict[str, float] = field(default_factory=dict)  # color accuracy of each prompt

    def format(self) -> str:
        s = self.score
        lines = [f"adherence over {s.images} images: color {s.color:.3f} (chance {s.chance_color:.3f}), "
                 f"shape {s.shape:.3f} (chance {s.chance_shape:.3f})",
                 *(f"  {acc:.2f}  {prompt}" for prompt, acc in self.per_prompt.items()),
                 f"  grid: {self.grid}", f"  results: {self.results}; MLflow run: {self.run_id or 'tracking off'}"]
        return "\n".join(lines)


def run_evaluation(config: EvaluateConfig) -> EvaluationSummary:
    """Draw every prompt with every seed (jobs/sample.py's path), detect, score, write and log."""
    prompts = config.prompts()
    for prompt in prompts:
        Scene.from_caption(prompt)  # refuse a prompt the detector cannot judge before sampling
    sampled = run_sampling(SampleConfig(
        checkpoint=config.checkpoint, run_id=config.run_id, prompts=prompts, seeds=config.seeds, width=config.width,
        height=config.height, steps=config.steps, cfg=config.cfg, batch_size=config.batch_size, device=config.device,
        out=config.out, grid=True, tracking=config.tracking, s3=config.s3))
    from PIL import Image

    images = [Image.open(path) for path in sampled.images]
    result, rows = score(images, [p for p in prompts for _ in config.seeds])
    for row, path in zip(rows, sampled.images):
        row["image"] = Path(path).name
    per_prompt = {p: sum(r["color_ok"] for r in rows if r["prompt"] == p) / len(config.seeds) for p in prompts}
    results = Path(config.out) / "adherence.json"
    results.write_text(json.dumps({"source": sampled.source, "color": result.color, "shape": result.shape,
                                   "chance_color": result.chance_color, "chance_shape": result.chance_shape,
                                   "per_prompt_color": per_prompt, "images": rows}, indent=1))
    run = _open_run(config)
    run.log_params({"adherence.chance_color": result.chance_color, "adherence.chance_shape": result.chance_shape,
                    "adherence.prompt_file": config.prompt_file, "adherence.seeds": config.seeds,
                    "adherence.size": f"{config.width}x{config.height}", "adherence.steps": config.steps,
                    "adherence.cfg": config.cfg})
    run.log_metrics({"adherence_color": result.color, "adherence_shape": result.shape}, step=0)
    run.log_artifact(sampled.grid, "adherence")
    run.log_artifact(results, "adherence")
    if not config.run_id:
        run.finish()
    return EvaluationSummary(score=result, grid=sampled.grid, results=str(results), run_id=run.run_id,
                             per_prompt=per_prompt)


def _open_run(config: EvaluateConfig) -> StageRun:
    """The training run named by `run_id`, else an `evaluate` stage run (reopened on a rerun)."""
    t = config.tracking
    if config.run_id:
        return StageRun.attach(tracking_uri=t.resolved_uri(), run_id=config.run_id)
    return StageRun.for_job(t, default_key=f"{t.parent_run_id or ''}/evaluate:{config.checkpoint}",
                            default_name=STAGE_EVALUATE, tags={STAGE_TAG: STAGE_EVALUATE,
                                                               EVALUATED_TAG: config.checkpoint})
