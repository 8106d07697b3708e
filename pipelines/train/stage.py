"""The driver of a progressive-resolution training stage (jobs/train_stage.py).

Resolve the latents, the starting weights (`init_from`, pipelines/train/lineage.py), the MLflow stage run;
launch a `TorchTrainer` (pipelines/train/harness.py) whose workers (pipelines/train/worker.py, `train_loop`)
read LATENTS/res=R through Ray Data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import ray

from pipelines.cluster import scaling
from pipelines.data.latent_store import read_manifest, res_dir
from pipelines.storage import resolve
from pipelines.tracking import (CHECKPOINT_TAG, INIT_FROM_TAG, INIT_REQUEST_TAG, LATENTS_DIGEST_TAG, LATENTS_TAG,
                                MODEL_TAG, PREV_RUN_TAG, RES_TAG, STAGE_TAG, STAGE_TRAIN, TEXT_ENCODER_TAG, StageRun)
from pipelines.train.config import TrainStageConfig
from pipelines.train.harness import fit, quiet_progress_bars
from pipelines.train.lineage import latents_digest, resolve_init
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

    fs, root = resolve(config.latents, config.s3)
    manifest = read_manifest(fs, root)
    check_latents(config.latents, manifest, config.res)
    tracking_uri = config.tracking.resolved_uri()
    stage_key = config.tracking.stage_key or f"{config.tracking.parent_run_id or ''}/{config.run_name}"
    prev_run, init_from = resolve_init(tracking_uri, config, stage_key)
    run = StageRun.for_job(config.tracking, default_key=stage_key, default_name=config.run_name, tags={
        STAGE_TAG: STAGE_TRAIN, RES_TAG: config.res, MODEL_TAG: config.model, TEXT_ENCODER_TAG: config.text_encoder,
        LATENTS_TAG: config.latents, LATENTS_DIGEST_TAG: latents_digest(manifest), INIT_REQUEST_TAG: config.init_from,
        INIT_FROM_TAG: init_from or "none", PREV_RUN_TAG: prev_run or "none"})
    with run.ending_on_error():  # FAILED on an error, KILLED when the job is stopped: never left RUNNING
        run.log_params(config.model_dump(mode="json"))
        quiet_progress_bars()
        out_fs, out_root = resolve(config.storage, config.s3)
        result = fit(train_loop, run=run, tracking_uri=tracking_uri, loop_config={
            "config": config.model_dump(mode="json"), "init_from": init_from, "vae": config.vae or manifest["vae"],
            "s3": config.s3.model_dump(mode="json")},
            scaling_config=scaling(config.workers, config.use_gpu, placement=config.placement),
            run_config=RunConfig(name=config.run_name, storage_path=out_root,
                                 storage_filesystem=out_fs if config.storage.startswith("s3://") else None,
                                 failure_config=FailureConfig(max_failures=config.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
            datasets={"train": _latents(config, fs, root)})
        path = result.checkpoint.path
        checkpoint = f"s3://{path}" if config.storage.startswith("s3://") else path
        run.set_tags({CHECKPOINT_TAG: checkpoint})
    run.finish()
    return TrainStageSummary(name=config.run_name, checkpoint=checkpoint, run_id=run.run_id,
                             metrics=dict(result.metrics))


def _latents(config: TrainStageConfig, fs: pafs.FileSystem, root: str) -> ray.data.Dataset:
    """The stage's LATENTS/res=R rows, held in the object store when the set is small: epochs then no longer
    re-read the files."""
    ds = ray.data.read_parquet(res_dir(root, config.res), filesystem=fs,
                               columns=["key", "caption", "latent", "latent_shape", "latent_std", "aspect"])
    stored = sum(f.size for f in fs.get_file_info(pafs.FileSelector(res_dir(root, config.res), recursive=True))
                 if f.type == pafs.FileType.File)
    return ds.materialize() if stored < config.cache_latents_below_mb * 2**20 else ds
