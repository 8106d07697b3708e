"""MLflow tracking: the only module that imports mlflow.

One parent run per pipeline, one child run per stage (`precompute`, `train-vae`, `train-256`, ...). A stage
run is found again by its `hdm.stage_key` tag, so a stage that restarts after a failure reopens its run
instead of creating a new one. Runs are addressed by id through `MlflowClient` (no global active run), so
any process (a Ray Train worker, the driver) can log to the same run. Without a tracking URI every call is
a no-op: tracking is optional.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import TrackingOptions
from pipelines.secrets import redact

# Every tag name the jobs set or read, defined here only.
STAGE_KEY = "hdm.stage_key"  # finds a stage's run again when it restarts
PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "hdm.stage"  # which job made the run: STAGE_TRAIN, STAGE_VAE, STAGE_EVALUATE
STAGE_TRAIN, STAGE_VAE, STAGE_EVALUATE = "train", "train-vae", "evaluate"
# A training stage's lineage: its resolution, model preset and text encoder (what `--init-from auto` matches
# on), the weights it started from and the run that made them, and its final checkpoint URI.
RES_TAG, MODEL_TAG, TEXT_ENCODER_TAG = "hdm.res", "hdm.model", "hdm.text_encoder"
INIT_FROM_TAG, PREV_RUN_TAG, CHECKPOINT_TAG = "hdm.init_from", "hdm.prev_run", "hdm.checkpoint"
INIT_REQUEST_TAG = "hdm.init_from_requested"  # the --init-from value the recorded source was resolved from
LATENTS_TAG, LATENTS_DIGEST_TAG = "hdm.latents", "hdm.latents_digest"  # the latent set a stage trained on
INIT_WEIGHTS_TAG = "hdm.init_weights_sha256"  # sha256 of the starting weights (a fresh start records none)
FINAL_WEIGHTS_TAG = "hdm.final_weights_sha256"
RESUMED_AT_TAG = "hdm.resumed_at_step"  # the step a relaunched training stage resumed from
INPUT_TAG, VAE_OUTPUT_TAG = "hdm.input", "hdm.output"  # the EQ-VAE job's images and its saved VAE
EVALUATED_TAG = "hdm.evaluated"  # the checkpoint an evaluate stage scored
# Set by the DAG runner on each stage's run (the jobs set their own tags above).
DAG_STAGE_TAG, DAG_KIND_TAG, DAG_DIGEST_TAG = "hdm.dag.stage", "hdm.dag.kind", "hdm.dag.digest"
DAG_DONE_TAG = "hdm.dag.done"  # the digest of the config the stage finished with
DAG_ERROR_TAG = "hdm.dag.error"
DAG_OUTPUT_TAG = "hdm.output."  # + output name: a URI a dependent stage reads


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server did not answer within the patience allowed (its URI is in the message)."""


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: nested config -> MLflow params."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


@dataclass(frozen=True)
class RunState:
    status: str  # RUNNING, FINISHED, FAILED, KILLED; NONE without a run
    tags: dict[str, str]
    metrics: dict[str, float]


class StageRun:
    """An MLflow run for one stage, created or reopened by `open`."""

    def __init__(self, client, run_id: str | None):
        self.client, self.run_id = client, run_id

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    @classmethod
    def open(cls, *, tracking_uri: str | None, experiment: str, stage_key: str, run_name: str,
             parent_run_id: str | None = None, tags: Mapping[str, str] | None = None) -> StageRun:
        """The run tagged `stage_key` in `experiment` (reopened: status RUNNING), or a new one."""
        if not tracking_uri:
            return cls(None, None)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(
            experiment, artifact_location=_artifact_location(tracking_uri, experiment))
        found = _runs_tagged(client, exp_id, {STAGE_KEY: stage_key}, max_results=1)
        all_tags = {STAGE_KEY: stage_key, **{k: str(v) for k, v in (tags or {}).items()}}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            for k, v in all_tags.items():
                client.set_tag(run_id, k, v)
        else:
            run_id = client.create_run(exp_id, tags=all_tags, run_name=run_name).info.run_id
        return cls(client, run_id)

    @classmethod
    def for_job(cls, tracking: TrackingOptions, *, default_key: str, default_name: str,
                tags: Mapping[str, Any]) -> StageRun:
        """A job's own stage run: `open` with the job's tracking options, where the DAG's stage key and run
        name (when a DAG runs the job) win over the job's defaults."""
        return cls.open(tracking_uri=tracking.resolved_uri(), experiment=tracking.experiment,
                        stage_key=tracking.stage_key or default_key, run_name=tracking.run_name or default_name,
                        parent_run_id=tracking.parent_run_id, tags=tags)

    @classmethod
    def attach(cls, *, tracking_uri: str | None, run_id: str | None) -> StageRun:
        """A handle on an existing run (e.g. in a Ray Train worker, from the id the driver opened)."""
        if not tracking_uri or not run_id:
            return cls(None, None)
        from mlflow import MlflowClient

        return cls(MlflowClient(tracking_uri=tracking_uri), run_id)

    @classmethod
    def find(cls, *, tracking_uri: str | None, experiment: str, stage_key: str) -> StageRun:
        """The run tagged `stage_key` in `experiment`, untouched; a disabled handle when there is none."""
        if not tracking_uri:
            return cls(None, None)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        found = [] if exp is None else _runs_tagged(client, exp.experiment_id, {STAGE_KEY: stage_key}, max_results=1)
        return cls(client, found[0].info.run_id if found else None)

    def state(self) -> RunState:
        """Status, tags and latest metrics of the run, read now."""
        if not self.enabled:
            return RunState("NONE", {}, {})
        run = self.client.get_run(self.run_id)
        return RunState(run.info.status, dict(run.data.tags), dict(run.data.metrics))

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params  # a reopened run keeps its params
        items = [Param(k, v) for k, v in flatten(redact(params)).items() if k not in existing]  # no credentials
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

    def log_image(self, image, artifact_file: str) -> None:
        """A PIL image or an (H, W, 3) uint8 array as an artifact (e.g. "grids/step-100.png")."""
        if self.enabled:
            self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / Path(artifact_file).name
                path.write_text(text)
                parent = str(Path(artifact_file).parent)
                self.client.log_artifact(self.run_id, str(path), None if parent == "." else parent)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self.client.set_terminated(self.run_id, status=status)


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of a sqlite store live beside the database (MLflow's default is ./mlruns of whatever
    directory the process runs in); a server decides for itself (None)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "artifacts" / experiment).as_uri()


@dataclass(frozen=True)
class RunRecord:
    """A run as a search returns it: enough to choose among runs and say which was chosen."""

    run_id: str
    name: str
    status: str
    tags: dict[str, str]


def search_runs(tracking_uri: str, *, experiment: str, tags: Mapping[str, str]) -> list[RunRecord]:
    """The runs of `experiment` carrying every tag of `tags` with that value, newest start first (none when
    the experiment does not exist)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return [RunRecord(r.info.run_id, r.info.run_name, r.info.status, dict(r.data.tags))
            for r in _runs_tagged(client, exp.experiment_id, tags, max_results=5000)]


def _runs_tagged(client, experiment_id: str, tags: Mapping[str, str], *, max_results: int) -> list:
    """MLflow's runs of the experiment carrying every tag of `tags` with that value, newest start first."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"],
                              max_results=max_results)


def checkpoint_uri_of_run(tracking_uri: str, run_id: str, *, tag: str = CHECKPOINT_TAG) -> str:
    """The final checkpoint URI (local path or s3://) a training stage run recorded in its `tag`."""
    from mlflow import MlflowClient

    uri = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).data.tags.get(tag)
    if not uri:
        raise LookupError(f"MLflow run {run_id} has no {tag!r} tag: no final checkpoint recorded yet")
    return uri
