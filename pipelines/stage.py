"""The driver of a progressive-resolution training stage (jobs/train_stage.py).

Resolve the latents, the starting weights (`init_from`), the MLflow stage run; launch a `TorchTrainer`
whose workers (pipelines/training.py, `train_loop`) read LATENTS/res=R through Ray Data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import ray

from .cluster import scaling
from .configs import StageConfig
from .latent_store import read_manifest, res_dir
from .storage import resolve
from .tracking import StageRun
from .training import train_loop


@dataclass
class StageSummary:
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


def find_previous_stage(tracking_uri: str, cfg: StageConfig) -> tuple[str, str]:
    """(run id, checkpoint URI) of the latest finished training run at the highest resolution below
    this one, in the same experiment (and pipeline run, when there is one)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    filters = ["tags.`hdm.stage` = 'train'", "attributes.status = 'FINISHED'"]
    if cfg.tracking.parent_run_id:
        filters.append(f"tags.`mlflow.parentRunId` = '{cfg.tracking.parent_run_id}'")
    runs = client.search_runs([exp.experiment_id], " and ".join(filters), order_by=["attributes.end_time DESC"]) \
        if exp else []
    lower = [r for r in runs if int(r.data.tags.get("hdm.res", 0)) < cfg.res and r.data.tags.get("hdm.checkpoint")]
    if not lower:
        raise LookupError(
            f"--init-from auto found no finished training run below {cfg.res} px in MLflow experiment "
            f"{cfg.tracking.experiment!r} at {tracking_uri}; pass --init-from CHECKPOINT_URI, or --init-from none "
            "to start from fresh weights")
    best = max(lower, key=lambda r: (int(r.data.tags["hdm.res"]), r.info.end_time or 0))
    return best.info.run_id, best.data.tags["hdm.checkpoint"]


def run_stage(config: StageConfig) -> StageSummary:
    """Run one stage on the Ray cluster this process is connected to."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    fs, root = resolve(config.latents, config.s3)
    manifest = read_manifest(fs, root)
    if manifest is None:
        raise FileNotFoundError(f"{config.latents} has no manifest.json: run precompute_latents.py first")
    if config.res not in manifest["resolutions"]:
        raise ValueError(f"{config.latents} has no res={config.res} latents (it has {manifest['resolutions']})")
    vae = config.vae or manifest["vae"]
    tracking_uri = config.tracking.resolved_uri()
    prev_run, init_from = None, None
    if config.init_from == "auto":
        prev_run, init_from = find_previous_stage(tracking_uri, config)
    elif config.init_from != "none":
        init_from = config.init_from
    run = StageRun.open(tracking_uri=tracking_uri, experiment=config.tracking.experiment,
                        stage_key=config.tracking.stage_key or f"{config.tracking.parent_run_id or ''}/{config.run_name}",
                        run_name=config.tracking.run_name or config.run_name, parent_run_id=config.tracking.parent_run_id,
                        tags={"hdm.stage": "train", "hdm.res": config.res, "hdm.latents": config.latents,
                              "hdm.latents_digest": latents_digest(manifest), "hdm.init_from": init_from or "none",
                              "hdm.prev_run": prev_run or "none"})
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
    run.set_tags({"hdm.checkpoint": checkpoint})
    run.finish()
    return StageSummary(name=config.run_name, checkpoint=checkpoint, run_id=run.run_id, metrics=dict(result.metrics))
