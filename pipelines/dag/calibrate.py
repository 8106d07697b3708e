"""Plans from measurements: `run_pipeline.py CONFIG --calibrate` runs a few steps of every training stage on
the actual cluster and records its throughput in MLflow; `--dry-run` then uses it instead of the TOML's
assumed `plan.throughput`.

A calibration is the DAG cut down to its `train` stages and what they need, each train stage with `steps`
reduced (log_every a quarter of them, so the last logged rate leaves the first steps' warm-up out), run by the
ordinary runner under the pipeline name `<name>-calibrate`: finished upstream stages (latents, the VAE) are
skipped as usual, missing ones run in full. The reduced stages write to folders of their own (their digests
differ), removed afterwards. Each measurement is one MLflow run in the pipeline's experiment, found again by the
stage's *shape* (what sets its throughput: model, resolution, batch, workers, TREAD rate, checkpointing...), not by
its full config: changing `steps` or the learning rate keeps the measurement.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipelines.dag.spec import DagConfig, StagePlan, experiment, plan, validate_stage

CALIBRATION_KIND = "calibration"  # tracking.DAG_KIND_TAG of a measurement's run
MEASURED_AT_TAG = "hdm.calibration.measured_at"  # ISO date and time of the measurement
STAGE_TAG = "hdm.calibration.stage"  # the stage it was measured for
THROUGHPUT = "samples_per_s_per_worker"  # what estimate.py reads, like plan.throughput
DEFAULT_STEPS = 20
# The job-config fields that set a training stage's throughput; the rest (steps, schedule, paths) does not
SHAPE_FIELDS = ("model", "res", "batch_size", "grad_accum", "workers", "tread_rate", "checkpointing", "ctx_length",
                "text_encoder", "text_cache_size", "compile", "precision", "placement", "torch_threads")


@dataclass(frozen=True)
class Measurement:
    throughput: float  # samples/s per worker
    measured_at: str  # ISO date and time


def shape(config: DagConfig, stage: StagePlan) -> dict[str, Any]:
    """What sets a training stage's throughput, from its validated job config."""
    job = validate_stage(config, stage).model_dump(mode="json")
    return {"kind": stage.kind, "use_gpu": config.pipeline.use_gpu,
            **{k: job[k] for k in SHAPE_FIELDS if k in job}}


def shape_key(config: DagConfig, stage: StagePlan) -> str:
    """The MLflow stage key of a measurement of this stage's shape."""
    digest = hashlib.sha256(json.dumps(shape(config, stage), sort_keys=True).encode()).hexdigest()
    return f"{CALIBRATION_KIND}/{digest[:16]}"


def calibration_config(config: DagConfig, *, steps: int = DEFAULT_STEPS) -> DagConfig:
    """The DAG a calibration runs: every train stage with `steps` steps and the stages they need, unchanged;
    quality gates off; the runs in the pipeline's own experiment under `<name>-calibrate`."""
    keep: set[str] = set()
    for name, spec in config.stages.items():
        if spec.kind == "train":
            keep |= {name, *_ancestors(config, name)}
    stages = {}
    for name in config.order():
        if name not in keep:
            continue
        spec = config.stages[name].model_dump(exclude_none=True, exclude={"gate", "extends"})
        if spec["kind"] == "train":
            spec["params"] = {**spec["params"], "steps": steps, "warmup_steps": min(
                spec["params"].get("warmup_steps", steps), steps // 2), "log_every": max(1, steps // 4),
                "checkpoint_every": steps}
        stages[name] = spec
    pipeline = config.pipeline.model_dump(exclude_none=True)
    pipeline["name"] = f"{config.pipeline.name}-calibrate"
    pipeline["tracking"] = {**pipeline.get("tracking", {}), "experiment": experiment(config)}
    return DagConfig.model_validate({"pipeline": pipeline, "stages": stages})


def _ancestors(config: DagConfig, name: str) -> set[str]:
    found, todo = set(), list(config.stages[name].needs)
    while todo:
        up = todo.pop()
        if up not in found:
            found.add(up)
            todo.extend(config.stages[up].needs)
    return found


def record(config: DagConfig, *, calibrated: DagConfig, tracking_uri: str, say) -> dict[str, Measurement]:
    """Read each reduced train stage's last logged rate from its run and record it as a measurement of the
    original stage's shape; remove the reduced stages' output folders."""
    from pipelines.storage import exists, resolve
    from pipelines.tracking import DAG_KIND_TAG, StageRun

    exp, now = experiment(config), datetime.now(timezone.utc).isoformat(timespec="seconds")
    original = {s.name: s for s in plan(config)}
    measured = {}
    for stage in plan(calibrated):
        if stage.kind != "train":
            continue
        state = StageRun.find(tracking_uri=tracking_uri, experiment=exp, stage_key=stage.stage_key).state()
        fs, path = resolve(stage.folder, config.pipeline.s3)
        if exists(fs, path):
            fs.delete_dir(path)
        rate = state.metrics.get("samples_per_s")
        if state.status != "FINISHED" or not rate:
            say(f"[{stage.name}] not measured: its calibration run is {state.status} with no samples_per_s")
            continue
        workers = validate_stage(calibrated, stage).workers or (4 if config.pipeline.use_gpu else 2)
        target = original[stage.name]
        run = StageRun.open(tracking_uri=tracking_uri, experiment=exp, stage_key=shape_key(config, target),
                            run_name=f"calibrate {stage.name}", tags={DAG_KIND_TAG: CALIBRATION_KIND,
                                                                      STAGE_TAG: stage.name, MEASURED_AT_TAG: now})
        run.log_params(shape(config, target))
        run.log_metrics({"samples_per_s": rate, THROUGHPUT: rate / workers,
                         "steps_per_s": state.metrics.get("steps_per_s", 0.0)}, step=0)
        run.finish()
        measured[stage.name] = Measurement(rate / workers, now)
        say(f"[{stage.name}] measured {rate:.2f} samples/s ({rate / workers:.2f} per worker, {workers} workers)")
    return measured


def lookup(config: DagConfig, stages: list[StagePlan]) -> dict[str, Measurement]:
    """The recorded measurements of the train stages' shapes, by stage name; none when there is no tracking
    server or it does not answer within seconds (a dry run never waits on MLflow)."""
    from pipelines.tracking import StageRun, TrackingUnavailable, check_reachable

    uri = config.pipeline.tracking.resolved_uri()
    if not uri or (uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists()):
        return {}  # no store yet, so nothing measured: do not create one
    try:
        check_reachable(uri, timeout_s=3.0)
        found = {}
        for stage in stages:
            if stage.kind != "train":
                continue
            state = StageRun.find(tracking_uri=uri, experiment=experiment(config),
                                  stage_key=shape_key(config, stage)).state()
            if state.status == "FINISHED" and state.metrics.get(THROUGHPUT):
                found[stage.name] = Measurement(state.metrics[THROUGHPUT], state.tags.get(MEASURED_AT_TAG, "?"))
        return found
    except (TrackingUnavailable, OSError):
        return {}
