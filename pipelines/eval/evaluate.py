"""jobs/evaluate.py's library side: draw fixed prompts with fixed seeds from a checkpoint and measure the images.

Metrics (names: pipelines/eval/metrics.py), each on when configured:
- `fid`: Frechet Inception distance to a folder of reference images (`reference` + `inception` weights);
- `clip_score`: CLIP score with any transformers CLIP model (`clip_model`);
- `adherence_color` / `adherence_shape`: the demo's detector (on by default when every prompt is a demo caption).
They go to MLflow at step 0: into the training run given by `run_id` (each stage's run holds its own scores),
else into an `evaluate` run. With a `sweep` (pipelines/eval/sweep.py), every (CFG, unconditional TREAD) point of
the grid is evaluated with the same prompts and seeds, logged as `sweep/<metric>` at step = point index, and the
best point's metrics are the stage's; the best setting can be written into the checkpoint as its sampling
defaults. See docs/evaluation.md.
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from pipelines import progress
from pipelines.config import S3Options, StrictModel, TrackingOptions
from pipelines.eval import metrics as names
from pipelines.tracking import EVALUATED_TAG, STAGE_EVALUATE, STAGE_TAG, StageRun

if TYPE_CHECKING:
    from hdm_model import HDMPipeline
    from PIL import Image

    from pipelines.eval.adherence import Score
    from pipelines.eval.clip_score import ClipScorer
    from pipelines.eval.fid import Statistics
    from pipelines.eval.inception import InceptionV3
    from pipelines.eval.sweep import SweepResult

RESULTS = "evaluation.json"  # in `out` and in the run's ARTIFACTS folder: settings, metrics, one row per image
SWEEP_RESULTS = "sweep.json"  # with a sweep: cfg, uncond_tread and every metric per point
ARTIFACTS = "evaluation"


class EvaluateConfig(StrictModel):
    """jobs/evaluate.py: sample every prompt with every seed from a checkpoint and measure the images.

    The source is `checkpoint` or `run_id`, as for sampling. With `run_id` the metrics go into that training
    run; with `checkpoint` into an `evaluate` run.
    """

    checkpoint: str | None = None  # checkpoint directory: local path or s3:// URI
    run_id: str | None = None  # MLflow training run: its `hdm.checkpoint`, and where the metrics go
    prompt_file: str  # one prompt per line (the demo's heldout.txt, or any prompts)
    seeds: list[int] = Field(default_factory=lambda: list(range(8)), min_length=1)
    width: int = 64
    height: int = 64
    steps: int = Field(16, ge=1)
    cfg: float = 3.0
    uncond_tread: float = Field(0.0, ge=0, lt=1)  # the unconditional branch's TREAD rate; 0: unrouted
    batch_size: int = Field(8, ge=1)  # seeds of one prompt per denoiser batch (images may differ by rounding)
    device: str | None = None  # None: cuda when available, else cpu
    out: str = "evaluation"  # local directory: the images, grid.png (rows = prompts) and evaluation.json
    reference: str | None = None  # folder of reference images for FID (local or s3://); None: no FID
    inception: str | None = None  # Inception-v3 weights for FID: .pth / .safetensors path (or s3://) or hub id
    inception_variant: Literal["fid", "torchvision"] = "fid"  # pytorch-fid's pt_inception or torchvision's file
    clip_model: str | None = None  # transformers CLIP model: hub id, local folder or s3://; None: no CLIP score
    adherence: bool | None = None  # the demo's detector; None: on when every prompt is a demo caption
    sweep: Any = None  # a SweepGrid (pipelines/eval/sweep.py): CFG x unconditional TREAD; None: one point
    tracking: TrackingOptions = TrackingOptions()
    s3: S3Options = S3Options()

    @model_validator(mode="before")
    @classmethod
    def _sweep_axes(cls, data: Any) -> Any:
        """A sweep that names one axis keeps the other at this config's fixed value."""
        if isinstance(data, dict) and isinstance(data.get("sweep"), dict):
            fixed = {k: [data.get(k, cls.model_fields[k].default)] for k in ("cfg", "uncond_tread")}
            data["sweep"] = {**fixed, **data["sweep"]}
        return data

    @field_validator("sweep", mode="before")
    @classmethod
    def _sweep_grid(cls, value: Any) -> Any:
        if value is None:
            return None
        from pipelines.eval.sweep import SweepGrid  # only when a sweep is asked for

        return SweepGrid.model_validate(value)

    @model_validator(mode="after")
    def _consistent(self) -> EvaluateConfig:
        if bool(self.checkpoint) == bool(self.run_id):
            raise ValueError("give exactly one of checkpoint, run_id")
        if self.reference and not self.inception:
            raise ValueError("reference needs inception: the Inception-v3 weights FID uses, a .pth / .safetensors "
                             "file or hub id (see docs/evaluation.md)")
        if self.inception and not self.reference:
            raise ValueError("inception is given without reference: FID needs a folder of reference images")
        return self

    def prompts(self) -> list[str]:
        """The prompt file's lines (read when the job runs: a pipeline validates this config before the
        stage that writes the file has run)."""
        if not Path(self.prompt_file).is_file():
            raise FileNotFoundError(f"no prompt file at {self.prompt_file}")
        return [line.strip() for line in Path(self.prompt_file).read_text().splitlines() if line.strip()]


@dataclass
class Judges:
    """The metrics' models, loaded once for every point: None where that metric is off."""

    adherence: bool
    inception: InceptionV3 | None = None
    reference: Statistics | None = None
    clip: ClipScorer | None = None

    def metrics(self) -> list[str]:
        on = {names.ADHERENCE_COLOR: self.adherence, names.ADHERENCE_SHAPE: self.adherence,
              names.FID: self.inception is not None, names.CLIP_SCORE: self.clip is not None}
        return [name for name in names.EVAL_METRICS if on[name]]


@dataclass
class PointResult:
    cfg: float
    uncond_tread: float
    metrics: dict[str, float]
    images: list[Image.Image]  # emptied once written, in a sweep
    rows: list[dict]  # one per image: prompt, seed and what each metric saw of it
    adherence: Score | None = None
    grid: Path | None = None  # where its images were written


def load_judges(config: EvaluateConfig, prompts: list[str], *, device: Any, scratch: Path) -> Judges:
    """The enabled metrics' models; FID's reference statistics (cached, see fid.reference_statistics)."""
    from pipelines.data.demo_data import Scene
    from pipelines.storage import download

    adherence = config.adherence
    if adherence is None:
        adherence = all(_is_demo_caption(p) for p in prompts)
    elif adherence:
        for prompt in prompts:
            Scene.from_caption(prompt)  # refuse a prompt the detector cannot judge, before sampling
    judges = Judges(adherence=adherence)
    if config.reference:
        from pipelines.eval.fid import reference_statistics
        from pipelines.eval.inception import load_inception

        if len(prompts) * len(config.seeds) < 2:
            raise ValueError("FID needs at least 2 images: give more seeds or prompts")
        judges.inception = load_inception(download(config.inception, scratch, config.s3),
                                          variant=config.inception_variant, device=device)
        judges.reference = reference_statistics(config.reference, model=judges.inception, s3=config.s3)
    if config.clip_model:
        from pipelines.eval.clip_score import ClipScorer

        judges.clip = ClipScorer(download(config.clip_model, scratch, config.s3), device=device)
    if not judges.metrics():
        raise ValueError("nothing to measure: the prompts are not demo captions (no adherence); give reference and "
                         "inception (FID) or clip_model (CLIP score)")
    return judges


def _is_demo_caption(prompt: str) -> bool:
    from pipelines.data.demo_data import Scene

    try:
        Scene.from_caption(prompt)
    except ValueError:
        return False
    return True


class ImageProgress:
    """The job's progress lines: images sampled out of `total`, with their rate."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.monotonic()

    def add(self, count: int) -> None:
        self.done += count
        progress.emit(done=self.done, total=self.total, unit="image",
                      rate=self.done / max(time.monotonic() - self.start, 1e-9))


def evaluate_point(config: EvaluateConfig, *, pipe: HDMPipeline, judges: Judges, prompts: list[str], cfg: float,
                   uncond_tread: float, sampled: ImageProgress | None = None) -> PointResult:
    """Sample every prompt with every seed once with the loaded pipeline (a progress line per prompt), and
    compute every enabled metric."""
    images: list[Image.Image] = []
    for prompt in prompts:  # each prompt is drawn on its own: a call per prompt draws the same images
        images += pipe([prompt], width=config.width, height=config.height, steps=config.steps, cfg_scale=cfg,
                       seeds=config.seeds, uncond_tread_rate=uncond_tread, batch_size=config.batch_size)
        if sampled is not None:
            sampled.add(len(config.seeds))
    pairs = [p for p in prompts for _ in config.seeds]  # prompt-major, as the pipeline draws them
    rows = [{"prompt": p, "seed": s} for p in prompts for s in config.seeds]
    result = PointResult(cfg=cfg, uncond_tread=uncond_tread, metrics={}, images=images, rows=rows)
    if judges.adherence:
        from pipelines.eval.adherence import score

        result.adherence, detections = score(images, pairs)
        for row, detection in zip(rows, detections):
            row.update({k: v for k, v in detection.items() if k != "prompt"})
        result.metrics |= {names.ADHERENCE_COLOR: result.adherence.color, names.ADHERENCE_SHAPE: result.adherence.shape}
    if judges.clip is not None:
        per_image = judges.clip.pair_scores(images, pairs)
        for row, value in zip(rows, per_image):
            row[names.CLIP_SCORE] = round(float(value), 3)
        result.metrics[names.CLIP_SCORE] = float(per_image.mean())
    if judges.inception is not None:
        from pipelines.eval.fid import fid

        result.metrics[names.FID] = fid(images, model=judges.inception, reference=judges.reference)
    return result


@dataclass
class EvaluationSummary:
    metrics: dict[str, float]
    grid: str
    results: str
    run_id: str | None
    images: int
    score: Score | None = None  # adherence, with its chance levels
    per_prompt: dict[str, float] = field(default_factory=dict)  # adherence: colour accuracy of each prompt
    sweep: SweepResult | None = None

    def format(self) -> str:
        lines = [f"evaluation over {self.images} images: "
                 + ", ".join(f"{k} {v:.3f}" for k, v in self.metrics.items())]
        if self.score is not None:
            s = self.score
            lines += [(f"adherence: color {s.color:.3f} (chance {s.chance_color:.3f}), "
                       f"shape {s.shape:.3f} (chance {s.chance_shape:.3f})"),
                      *(f"  {acc:.2f}  {prompt}" for prompt, acc in self.per_prompt.items())]
        if self.sweep is not None:
            best = self.sweep.best
            lines.append(f"sweep over {len(self.sweep.points)} points: best by {self.sweep.metric}: cfg {best.cfg}, "
                         f"uncond_tread {best.uncond_tread}")
        lines += [f"  grid: {self.grid}", f"  results: {self.results}; MLflow run: {self.run_id or 'tracking off'}"]
        return "\n".join(lines)


def run_evaluation(config: EvaluateConfig) -> EvaluationSummary:
    """Load the pipeline and the judges once, evaluate one point (or every point of the sweep), write the
    images, grid and results to `out`, and log metrics, parameters and artifacts to MLflow."""
    from pipelines.eval.sampling import SampleConfig, checkpoint_of_run, load_pipeline

    prompts = config.prompts()
    with tempfile.TemporaryDirectory(prefix="hdm-evaluate-") as scratch:  # copies of s3:// inputs
        sampling = SampleConfig(checkpoint=config.checkpoint, run_id=config.run_id, prompts=prompts,
                                device=config.device, tracking=config.tracking, s3=config.s3)
        checkpoint = config.checkpoint or checkpoint_of_run(sampling)  # resolved once: the sweep writes into it
        pipe = load_pipeline(sampling.model_copy(update={"checkpoint": checkpoint, "run_id": None}), Path(scratch))
        judges = load_judges(config, prompts, device=pipe.device, scratch=Path(scratch))
    if config.sweep is not None and config.sweep.metric not in judges.metrics():
        raise ValueError(f"the sweep picks its best point by {config.sweep.metric}, which this evaluation does not "
                         f"measure (it measures {', '.join(judges.metrics())}): set sweep metric to one of those")
    run = _open_run(config)
    with nullcontext() if config.run_id else run.ending_on_error():  # a training run is not ours to mark
        point, sweep = _evaluate(config, run=run, pipe=pipe, judges=judges, prompts=prompts, checkpoint=checkpoint)
        summary = _report(config, run=run, point=point, sweep=sweep, source=checkpoint, judges=judges)
        if not config.run_id:
            run.finish()
    return summary


def _evaluate(config: EvaluateConfig, *, run: StageRun, pipe: HDMPipeline, judges: Judges, prompts: list[str],
              checkpoint: str) -> tuple[PointResult, SweepResult | None]:
    """One point at the config's settings, or the sweep (each point's images under out/sweep/<index>/)."""
    points_total = 1 if config.sweep is None else len(config.sweep.cfg) * len(config.sweep.uncond_tread)
    sampled = ImageProgress(len(prompts) * len(config.seeds) * points_total)

    def at(cfg: float, uncond_tread: float) -> PointResult:
        return evaluate_point(config, pipe=pipe, judges=judges, prompts=prompts, cfg=cfg, uncond_tread=uncond_tread,
                              sampled=sampled)

    if config.sweep is None:
        return at(config.cfg, config.uncond_tread), None
    from pipelines.eval.sweep import run_sweep, write_sampling_defaults

    points: list[PointResult] = []

    def evaluate(cfg: float, uncond_tread: float) -> dict[str, float]:
        point = at(cfg, uncond_tread)
        _write_images(point, Path(config.out) / "sweep" / str(len(points)), seeds=config.seeds)
        point.images = []  # on disk now: a sweep of large images need not hold them all
        points.append(point)
        return point.metrics

    def log_point(index: int, point) -> None:
        run.log_metrics({"sweep/cfg": point.cfg, "sweep/uncond_tread": point.uncond_tread,
                         **{f"sweep/{k}": v for k, v in point.metrics.items()}}, step=index)

    result = run_sweep(config.sweep, evaluate_point=evaluate, log_point=log_point)
    best = next(p for p in points if (p.cfg, p.uncond_tread) == (result.best.cfg, result.best.uncond_tread))
    run.log_params({"sweep.metric": result.metric, "sweep.best_cfg": best.cfg,
                    "sweep.best_uncond_tread": best.uncond_tread})
    if config.sweep.write_defaults:
        why = f"evaluate sweep: best {result.metric} {best.metrics[result.metric]:.4g}"
        written = write_sampling_defaults(checkpoint, cfg=best.cfg, uncond_tread=best.uncond_tread, source=why,
                                          s3=config.s3)
        run.log_params({"sweep.defaults_written": written})
    return best, result


def _report(config: EvaluateConfig, *, run: StageRun, point: PointResult, sweep: SweepResult | None, source: str,
            judges: Judges) -> EvaluationSummary:
    """Write the images, grid and results json of the stage's point; log its metrics, parameters, artifacts."""
    out = Path(config.out)
    grid = point.grid or _write_images(point, out, seeds=config.seeds)  # a sweep's best point is written already
    summary = EvaluationSummary(metrics=point.metrics, grid=str(grid), results=str(out / RESULTS), run_id=run.run_id,
                                images=len(point.rows), score=point.adherence, sweep=sweep)
    report: dict[str, Any] = {"source": source, "settings": _settings(config, point), "metrics": point.metrics}
    if point.adherence is not None:
        s = point.adherence
        summary.per_prompt = {p: sum(r["color_ok"] for r in point.rows if r["prompt"] == p) / len(config.seeds)
                              for p in dict.fromkeys(r["prompt"] for r in point.rows)}
        report |= {"color": s.color, "shape": s.shape, "chance_color": s.chance_color,
                   "chance_shape": s.chance_shape, "per_prompt_color": summary.per_prompt}
        run.log_params({"adherence.chance_color": s.chance_color, "adherence.chance_shape": s.chance_shape})
    if judges.reference is not None:
        report["fid_reference_images"] = judges.reference.count
    (out / RESULTS).write_text(json.dumps({**report, "images": point.rows}, indent=1))
    run.log_params({f"evaluate.{k}": v for k, v in report["settings"].items()})
    run.log_metrics(point.metrics, step=0)
    run.log_artifact(grid, ARTIFACTS)
    run.log_artifact(out / RESULTS, ARTIFACTS)
    if sweep is not None:
        table = [{"cfg": p.cfg, "uncond_tread": p.uncond_tread, **p.metrics} for p in sweep.points]
        (out / SWEEP_RESULTS).write_text(json.dumps({"metric": sweep.metric, "points": table}, indent=1))
        run.log_artifact(out / SWEEP_RESULTS, ARTIFACTS)
    return summary


def _settings(config: EvaluateConfig, point: PointResult) -> dict[str, Any]:
    """What the numbers depend on: compare metrics only between runs with equal settings."""
    return {"prompt_file": config.prompt_file, "seeds": config.seeds, "images": len(point.rows),
            "size": f"{config.width}x{config.height}", "steps": config.steps, "cfg": point.cfg,
            "uncond_tread": point.uncond_tread, "reference": config.reference, "inception": config.inception,
            "inception_variant": config.inception_variant if config.reference else None,
            "clip_model": config.clip_model}


def _write_images(point: PointResult, out: Path, *, seeds: list[int]) -> Path:
    """The point's images and grid.png as jobs/sample.py writes them (sampling.write_images); names each row's
    image file in it (`image`); sets and returns `point.grid`."""
    from pipelines.eval.sampling import write_images

    prompts = [row["prompt"] for row in point.rows[::len(seeds)]]  # rows are prompt-major, as the images
    paths, grid = write_images(point.images, out, prompts=prompts, seeds=seeds, grid=True)
    for row, path in zip(point.rows, paths, strict=True):
        row["image"] = Path(path).name
    point.grid = Path(grid)
    return point.grid


def _open_run(config: EvaluateConfig) -> StageRun:
    """The training run named by `run_id`, else an `evaluate` stage run (reopened on a rerun)."""
    t = config.tracking
    if config.run_id:
        return StageRun.attach(tracking_uri=t.resolved_uri(), run_id=config.run_id)
    return StageRun.for_job(t, default_key=f"{t.parent_run_id or ''}/evaluate:{config.checkpoint}",
                            default_name=STAGE_EVALUATE, tags={STAGE_TAG: STAGE_EVALUATE,
                                                               EVALUATED_TAG: config.checkpoint})
