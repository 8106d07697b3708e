"""The driver of a progressive-resolution training stage (jobs/train_stage.py).

Resolve the latents, the starting weights (`init_from`), the MLflow stage run; launch a `TorchTrainer`
whose workers (pipelines/train/worker.py, `train_loop`) read LATENTS/res=R through Ray Data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import ray

from pipelines.cluster import scaling
from pipelines.train.config import TrainStageConfig
from pipelines.data.latent_store import read_manifest, res_dir
from pipelines.storage import resolve
from pipelines.tracking import (CHECKPOINT_TAG, INIT_FROM_TAG, INIT_REQUEST_TAG, MODEL_TAG, PREV_RUN_TAG, RES_TAG,
                       TEXT_ENCODER_TAG, StageRun)
from pipelines.train.worker import train_loop


@dataclass
class TrainStageSummary:
    name: str
    checkpoint: str
    run_id: str | None
    metrics: dict[str, Any] = field(default_factory=dict)

    def format(self) -> str:
        return (f"{self.name}: final checkpoint {self.checkpoint}\n  step {self.metrics.get('step')}, "
                f"last loss {self.metrics.get('loss', float('nan')):.4f}; MLflow run {self.run_id}")


def latents_digest(manifest: dict[str, Any]) -> str:
    """What identifies a latent dataset's content: VAE, statistics, transform and row counts."""
    keys = ("vae_config_sha256", "latent_mean", "latent_std", "transform", "rows")
    return hashlib.sha256(json.dumps({k: manifest.get(k) for k in keys}, sort_keys=True).encode()).hexdigest()[:16]


def _training_runs(tracking_uri: str, cfg: TrainStageConfig) -> list:
    """Training-stage runs of this stage's lineage, newest start first: under a DAG, the children of the same
    pipeline run; otherwise the runs of the same experiment with the same model preset and text encoder."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return []
    filters = ["tags.`hdm.stage` = 'train'"]
    if cfg.tracking.parent_run_id:
        filters.append(f"tags.`mlflow.parentRunId` = '{cfg.tracking.parent_run_id}'")
    runs = client.search_runs([exp.experiment_id], " and ".join(filters), order_by=["attributes.start_time DESC"],
                              max_results=5000)
    if cfg.tracking.parent_run_id:
        return list(runs)
    return [r for r in runs if r.data.tags.get(MODEL_TAG) == cfg.model
            and r.data.tags.get(TEXT_ENCODER_TAG) == cfg.text_encoder]


def _describe(run) -> str:
    return f"run {run.info.run_name!r} ({run.info.run_id}, {run.data.tags.get(RES_TAG)} px)"


def find_previous_stage(tracking_uri: str, cfg: TrainStageConfig) -> tuple[str, str]:
    """(run id, checkpoint URI) for `--init-from auto`: the latest run of this lineage at the highest resolution
    below this one. Refuses, naming the run, when that run failed, is still running or recorded no checkpoint,
    rather than falling back to an older run or a lower resolution."""
    lower = [r for r in _training_runs(tracking_uri, cfg) if int(r.data.tags.get(RES_TAG, 0)) < cfg.res]
    lineage = (f"pipeline run {cfg.tracking.parent_run_id}" if cfg.tracking.parent_run_id else
               f"MLflow experiment {cfg.tracking.experiment!r} with model {cfg.model!r} and text encoder "
               f"{cfg.text_encoder!r}")
    if not lower:
        raise LookupError(
            f"--init-from auto found no finished training run below {cfg.res} px in {lineage} at {tracking_uri}; "
            "pass --init-from CHECKPOINT_URI, or --init-from none to start from fresh weights")
    prev_res = max(int(r.data.tags[RES_TAG]) for r in lower)
    latest = next(r for r in lower if int(r.data.tags[RES_TAG]) == prev_res)  # newest start first
    checkpoint = latest.data.tags.get(CHECKPOINT_TAG)
    if latest.info.status != "FINISHED" or not checkpoint:
        state = latest.info.status if latest.info.status != "FINISHED" else "FINISHED without a checkpoint tag"
        raise LookupError(
            f"--init-from auto: the latest {prev_res} px training {_describe(latest)} in {lineage} is {state}; "
            f"finish or rerun that stage first, or pass --init-from CHECKPOINT_URI explicitly")
    return latest.info.run_id, checkpoint


def run_of_checkpoint(tracking_uri: str, cfg: TrainStageConfig, uri: str) -> str | None:
    """The id of the training run (same experiment) whose final checkpoint is `uri`, if any: the lineage of
    an explicit --init-from, as the DAG passes the previous stage's checkpoint."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`hdm.stage` = 'train'", max_results=5000) if exp else []
    return next((r.info.run_id for r in runs if r.data.tags.get(CHECKPOINT_TAG) == uri.rstrip("/")), None)


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


def check_latents(uri: str, manifest: dict[str, Any] | None, res: int) -> None:
    """Refuse a latent set that has no manifest, is not complete (a precompute still running or interrupted),
    or lacks this resolution."""
    if manifest is None:
        raise FileNotFoundError(f"{uri} has no manifest.json: run precompute_latents.py first")
    if manifest.get("status") != "complete":
        raise ValueError(f"the latent set {uri} is not complete (manifest status {manifest.get('status')!r}): "
                         "its precompute is still running or was interrupted; rerun precompute_latents.py with "
                         "the same output to finish it (it skips what is written)")
    if res not in manifest["resolutions"]:
        raise ValueError(f"{uri} has no res={res} latents (it has {manifest['resolutions']})")


def run_training_stage(config: TrainStageConfig) -> TrainStageSummary:
    """Run one stage on the Ray cluster this process is connected to."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    fs, root = resolve(config.latents, config.s3)
    manifest = read_manifest(fs, root)
    check_latents(config.latents, manifest, config.res)
    vae = config.vae or manifest["vae"]
    tracking_uri = config.tracking.resolved_uri()
    stage_key = config.tracking.stage_key or f"{config.tracking.parent_run_id or ''}/{config.run_name}"
    prev_run, init_from = resolve_init(tracking_uri, config, stage_key)
    run = StageRun.open(tracking_uri=tracking_uri, experiment=config.tracking.experiment, stage_key=stage_key,
                        run_name=config.tracking.run_name or config.run_name, parent_run_id=config.tracking.parent_run_id,
                        tags={"hdm.stage": "train", RES_TAG: config.res, MODEL_TAG: config.model,
                              TEXT_ENCODER_TAG: config.text_encoder, "hdm.latents": config.latents,
                              "hdm.latents_digest": latents_digest(manifest), INIT_REQUEST_TAG: config.init_from,
                              INIT_FROM_TAG: init_from or "none", PREV_RUN_TAG: prev_run or "none"})
    run.log_params(config.model_dump(mode="json"))
    ray.data.DataContext.get_current().enable_progress_bars = False  # the workers' log lines say more
    out_fs, out_root = resolve(config.storage, config.s3)
    ds = ray.data.read_parquet(res_dir(root, config.res), filesystem=fs,
                               columns=["key", "caption", "latent", "latent_shape", "latent_std", "aspect"])
    stored = sum(f.size for f in fs.get_file_info(pafs.FileSelector(res_dir(root, config.res), recursive=True))
                 if f.type == pafs.FileType.File)
    if stored < config.cache_latents_below_mb * 2**20:
        ds = ds.materialize()  # small sets stay in the object store: epochs no longer re-read the files
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config.model_dump(mode="json"), "init_from": init_from, "vae": vae,
                           "run_id": run.run_id, "tracking_uri": tracking_uri,
                           "s3": config.s3.model_dump(mode="json")},
        scaling_config=scaling(config.workers, config.use_gpu),
        run_config=RunConfig(name=config.run_name, storage_path=out_root,
                             storage_filesystem=out_fs if config.storage.startswith("s3://") else None,
                             failure_config=FailureConfig(max_failures=config.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": ds})
    try:
        result = trainer.fit()
    except Exception:
        run.finish("FAILED")
        raise
    path = result.checkpoint.path
    checkpoint = f"s3://{path}" if config.storage.startswith("s3://") else path
    run.set_tags({CHECKPOINT_TAG: checkpoint})
    run.finish()
    return TrainStageSummary(name=config.run_name, checkpoint=checkpoint, run_id=run.run_id, metrics=dict(result.metrics))
