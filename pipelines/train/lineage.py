"""Where a training stage starts from (`--init-from`) and what it trains on, as recorded in MLflow: the
previous stage's run and checkpoint, resolved once per stage run, and the digest of its latent set."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipelines.tracking import (CHECKPOINT_TAG, INIT_FROM_TAG, INIT_REQUEST_TAG, MODEL_TAG, PARENT_TAG, PREV_RUN_TAG,
                                RES_TAG, STAGE_TAG, STAGE_TRAIN, TEXT_ENCODER_TAG, RunRecord, StageRun, search_runs)
from pipelines.train.config import TrainStageConfig


def latents_digest(manifest: dict[str, Any]) -> str:
    """What identifies a latent dataset's content: VAE, statistics, transform and row counts."""
    keys = ("vae_config_sha256", "latent_mean", "latent_std", "transform", "rows")
    return hashlib.sha256(json.dumps({k: manifest.get(k) for k in keys}, sort_keys=True).encode()).hexdigest()[:16]


def _training_runs(tracking_uri: str, cfg: TrainStageConfig) -> list[RunRecord]:
    """Training-stage runs of this stage's lineage, newest start first: under a DAG, the children of the same
    pipeline run; otherwise the runs of the same experiment with the same model preset and text encoder."""
    parent = cfg.tracking.parent_run_id
    runs = search_runs(tracking_uri, experiment=cfg.tracking.experiment,
                       tags={STAGE_TAG: STAGE_TRAIN, **({PARENT_TAG: parent} if parent else {})})
    if parent:
        return runs
    return [r for r in runs if r.tags.get(MODEL_TAG) == cfg.model and r.tags.get(TEXT_ENCODER_TAG) == cfg.text_encoder]


def _describe(run: RunRecord) -> str:
    return f"run {run.name!r} ({run.run_id}, {run.tags.get(RES_TAG)} px)"


def find_previous_stage(tracking_uri: str, cfg: TrainStageConfig) -> tuple[str, str]:
    """(run id, checkpoint URI) for `--init-from auto`: the latest run of this lineage at the highest resolution
    below this one. Refuses, naming the run, when that run failed, is still running or recorded no checkpoint,
    rather than falling back to an older run or a lower resolution."""
    lower = [r for r in _training_runs(tracking_uri, cfg) if int(r.tags.get(RES_TAG, 0)) < cfg.res]
    lineage = (f"pipeline run {cfg.tracking.parent_run_id}" if cfg.tracking.parent_run_id else
               f"MLflow experiment {cfg.tracking.experiment!r} with model {cfg.model!r} and text encoder "
               f"{cfg.text_encoder!r}")
    if not lower:
        raise LookupError(
            f"--init-from auto found no finished training run below {cfg.res} px in {lineage} at {tracking_uri}; "
            "pass --init-from CHECKPOINT_URI, or --init-from none to start from fresh weights")
    prev_res = max(int(r.tags[RES_TAG]) for r in lower)
    latest = next(r for r in lower if int(r.tags[RES_TAG]) == prev_res)  # newest start first
    checkpoint = latest.tags.get(CHECKPOINT_TAG)
    if latest.status != "FINISHED" or not checkpoint:
        state = latest.status if latest.status != "FINISHED" else "FINISHED without a checkpoint tag"
        raise LookupError(
            f"--init-from auto: the latest {prev_res} px training {_describe(latest)} in {lineage} is {state}; "
            f"finish or rerun that stage first, or pass --init-from CHECKPOINT_URI explicitly")
    return latest.run_id, checkpoint


def run_of_checkpoint(tracking_uri: str, cfg: TrainStageConfig, uri: str) -> str | None:
    """The id of the training run (same experiment) whose final checkpoint is `uri`, if any: the lineage of
    an explicit --init-from, as the DAG passes the previous stage's checkpoint."""
    runs = search_runs(tracking_uri, experiment=cfg.tracking.experiment, tags={STAGE_TAG: STAGE_TRAIN})
    return next((r.run_id for r in runs if r.tags.get(CHECKPOINT_TAG) == uri.rstrip("/")), None)


def resolve_init(tracking_uri: str, cfg: TrainStageConfig, stage_key: str) -> tuple[str | None, str | None]:
    """(previous run id, starting weights URI), resolved once: a relaunch of the stage run (same stage key)
    reuses what its first launch recorded, so a later run elsewhere cannot change where this stage started."""
    recorded = StageRun.find(tracking_uri=tracking_uri, experiment=cfg.tracking.experiment, stage_key=stage_key)
    tags = recorded.state().tags
    if INIT_FROM_TAG in tags and tags.get(INIT_REQUEST_TAG) == cfg.init_from:
        init, prev = tags[INIT_FROM_TAG], tags.get(PREV_RUN_TAG, "none")
        return (None if prev == "none" else prev), (None if init == "none" else init)
    if cfg.init_from == "auto":
        return find_previous_stage(tracking_uri, cfg)
    if cfg.init_from == "none":
        return None, None
    return run_of_checkpoint(tracking_uri, cfg, cfg.init_from), cfg.init_from
