"""What `jobs/run_pipeline.py --dry-run` prints: every stage of a DAG in order, with its work, storage, time
and worker-hours where throughput is known: measured on the cluster (`--calibrate`, pipelines/dag/calibrate.py)
or assumed in the TOML (`plan = { throughput = ... }`); with a price per GPU-hour, the cost."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from pipelines.dag.calibrate import Measurement
from pipelines.dag.spec import KINDS, DagConfig, StagePlan, experiment, storage_root, validate_stage
from pipelines.data.config import PrecomputeConfig
from pipelines.train.config import TrainStageConfig, VAETrainConfig


LATENT_BYTES_PER_CELL = 4 * 2  # 4 channels, fp16 (an f8c4 VAE: EQ-SDXL-VAE and the tiny configs)


def estimate(config: DagConfig, stage: StagePlan, job: BaseModel,
             measured: Measurement | None = None) -> dict[str, Any]:
    """What --dry-run prints for a stage: work, storage, time and worker-hours where figures allow; a training
    stage's `measured` throughput wins over the TOML's assumed one."""
    spec = config.stages[stage.name]
    figures = spec.plan
    if measured is not None:
        figures = figures.model_copy(update={"throughput": measured.throughput})
    images = figures.images or config.pipeline.images
    out: dict[str, Any] = {}
    if isinstance(job, (TrainStageConfig, VAETrainConfig)):  # both train on Ray Train: workers x batch [x accum]
        workers = job.workers or (4 if config.pipeline.use_gpu else 2)
        accum = getattr(job, "grad_accum", 1)
        samples = job.steps * job.batch_size * accum * workers
        out.update(steps=job.steps, workers=workers, samples=samples,
                   batch=f"{workers} x {job.batch_size} x {accum} accum")
        if images and isinstance(job, TrainStageConfig):
            out["epochs"] = samples / images
        if figures.throughput:
            hours = samples / (figures.throughput * workers) / 3600
            out.update(hours=hours, worker_hours=hours * workers,
                       source=f"measured {measured.measured_at[:10]}" if measured else "assumed",
                       throughput=figures.throughput)
    elif isinstance(job, PrecomputeConfig):
        if images:
            copies = 2 if job.store_std else 1
            out["storage"] = {r: images * (r // 8) ** 2 * LATENT_BYTES_PER_CELL * copies for r in job.resolutions}
            if figures.throughput:
                out["hours"] = images * len(job.resolutions) / figures.throughput / 3600
    elif images and figures.throughput:
        out["hours"] = images / figures.throughput / 3600
    return out


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_plan(config: DagConfig, stages: list[StagePlan], *, measured: dict[str, Measurement] | None = None,
                price_per_gpu_hour: float | None = None) -> str:
    """The --dry-run report: stages in order, what each does and costs, totals. `measured`: throughput
    measurements by stage name (calibrate.lookup); `price_per_gpu_hour`: adds each stage's and the total cost."""
    lines = [f"pipeline {config.pipeline.name}: {len(stages)} stages, storage {storage_root(config)}, "
             f"MLflow experiment {experiment(config)!r}"]
    total_hours = total_worker_hours = 0.0
    known = True
    for i, stage in enumerate(stages, 1):
        job = validate_stage(config, stage)
        est = estimate(config, stage, job, (measured or {}).get(stage.name))
        needs = ", ".join(stage.needs) or "-"
        lines.append(f"{i:2d}. {stage.name} [{stage.kind}: {KINDS[stage.kind].job}] needs {needs}")
        lines.append(f"      output {stage.folder}")
        details = []
        if "steps" in est:
            details.append(f"{est['steps']:,} steps, {est['samples']:,} samples ({est['batch']})")
        if "epochs" in est:
            details.append(f"{est['epochs']:.2f} epochs")
        if "storage" in est:
            details.append("latents " + ", ".join(f"{r} px {_size(b)}" for r, b in est["storage"].items())
                           + " (square images, fp16)")
        if "hours" in est:
            details.append(f"about {est['hours']:.2f} h")
            total_hours += est["hours"]
        elif stage.kind in ("train", "vae", "precompute"):
            known = False
        if "worker_hours" in est:
            details.append(f"{est['worker_hours']:.1f} {'GPU' if config.pipeline.use_gpu else 'worker'}-hours "
                           f"({est['source']}: {est['throughput']:,.2f} samples/s per worker)")
            if price_per_gpu_hour is not None:
                details.append(f"cost {est['worker_hours'] * price_per_gpu_hour:,.2f}")
            total_worker_hours += est["worker_hours"]
        if details:
            lines.append("      " + "; ".join(details))
    unit = "GPU" if config.pipeline.use_gpu else "worker"
    cost = "" if price_per_gpu_hour is None else (
        f", cost {total_worker_hours * price_per_gpu_hour:,.2f} at {price_per_gpu_hour:,.2f} per {unit}-hour")
    lines.append(f"total: about {total_hours:.1f} h, {total_worker_hours:.1f} {unit}-hours{cost}"
                 + ("" if known else " (stages without a measured or assumed throughput not counted)"))
    return "\n".join(lines)
