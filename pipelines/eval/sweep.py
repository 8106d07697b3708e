"""Guidance sweep: CFG scale x the unconditional branch's TREAD rate (HDM's auto-guidance) on a grid.

The evaluate job (pipelines/eval/evaluate.py) samples and measures each point; this module walks the grid in a
fixed order, picks the best point by one metric (pipelines/eval/metrics.py says which way is better) and writes
a setting into a checkpoint as its sampling defaults (sampling.json, owned by hdm_model.checkpoint), which
HDMPipeline and jobs/sample.py use when no flag names the guidance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from pydantic import Field, field_validator

from pipelines.config import S3Options, StrictModel
from pipelines.eval import metrics as names


class SweepGrid(StrictModel):
    """Every cfg with every uncond_tread, cfg outer; the best point by `metric`."""

    cfg: list[Annotated[float, Field(ge=1.0)]] = Field(min_length=1)  # 1.0 = no guidance
    uncond_tread: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(min_length=1)  # 0 = unrouted
    metric: str = names.ADHERENCE_COLOR
    write_defaults: bool = True  # write the best point into the evaluated checkpoint

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in names.EVAL_METRICS:
            raise ValueError(f"unknown sweep metric {value!r}: use one of {', '.join(names.EVAL_METRICS)}")
        return value


@dataclass
class SweepPoint:
    cfg: float
    uncond_tread: float
    metrics: dict[str, float]


@dataclass
class SweepResult:
    metric: str
    points: list[SweepPoint]  # in grid order
    best: SweepPoint


def run_sweep(grid: SweepGrid, *, evaluate_point: Callable[[float, float], dict[str, float]],
              log_point: Callable[[int, SweepPoint], None] | None = None) -> SweepResult:
    """Evaluate every point (cfg outer, uncond_tread inner), log each as it comes (`log_point(index, point)`),
    and return them with the best by `grid.metric`: ties keep the earlier point, and a point whose value is not
    finite (NaN) wins only when no point has a finite one."""
    points: list[SweepPoint] = []
    best: SweepPoint | None = None
    for cfg in grid.cfg:
        for uncond_tread in grid.uncond_tread:
            measured = dict(evaluate_point(cfg, uncond_tread))
            if grid.metric not in measured:
                raise ValueError(f"sweep point cfg {cfg}, uncond_tread {uncond_tread} has no {grid.metric} (it has "
                                 f"{', '.join(measured) or 'no metrics'}): pick a sweep metric the evaluation measures")
            point = SweepPoint(cfg=cfg, uncond_tread=uncond_tread, metrics=measured)
            if log_point is not None:
                log_point(len(points), point)
            points.append(point)
            if best is None or _beats(grid.metric, point, best):
                best = point
    return SweepResult(metric=grid.metric, points=points, best=best)


def _beats(metric: str, a: SweepPoint, b: SweepPoint) -> bool:
    x, y = a.metrics[metric], b.metrics[metric]
    if not math.isfinite(y):
        return math.isfinite(x)
    return math.isfinite(x) and names.better(metric, x, y)


def write_sampling_defaults(checkpoint: str, *, cfg: float, uncond_tread: float, source: str,
                            s3: S3Options = S3Options()) -> str:
    """Write sampling.json into a checkpoint (a local directory or an s3:// prefix), atomically; a path that
    holds no checkpoint is refused. Returns the file written."""
    from hdm_model.checkpoint import SAMPLING, SAMPLING_FILES, SamplingDefaults
    from hdm_model.checkpoint import write_sampling_defaults as write_local

    from pipelines.storage import exists, join, resolve, write_bytes_atomic

    defaults = SamplingDefaults(cfg_scale=cfg, uncond_tread_rate=uncond_tread, source=source)
    if not checkpoint.startswith("s3://"):
        _, path = resolve(checkpoint, s3)  # an absolute path (a relative one in a Ray job is refused there)
        return str(write_local(path, defaults))
    fs, path = resolve(checkpoint, s3)
    missing = [name for name in SAMPLING_FILES if not exists(fs, join(path, name))]
    if missing:
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint (no {missing[0]}): sampling defaults go beside "
                                "a checkpoint's weights")
    write_bytes_atomic(fs, join(path, SAMPLING), defaults.to_text().encode())
    return f"{checkpoint.rstrip('/')}/{SAMPLING}"
