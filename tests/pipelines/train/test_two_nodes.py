"""A training stage across two Ray nodes on this machine, one worker on each (placement strict_spread); the second
node is killed mid-run (SIGKILL by its PID, as a crash) and a new one started: the stage resumes from its last
registered checkpoint on S3 and finishes, and MLflow holds one run with every step once."""

from __future__ import annotations

import collections
import json
import shlex
import time
import typing
import uuid

import pytest
from mlflow import MlflowClient

import services  # infra/local/services.py (tests/conftest.py puts it on the path)
from hdm_model import checkpoint
from pipelines.cluster import PLACEMENT
from pipelines.config import S3Options
from pipelines.tracking import CHECKPOINT_TAG, RESUMED_AT_TAG
from pipelines.train.config import TrainStageConfig

from tests.pipelines.helpers import ROOT
from tests.pipelines.latent_fixtures import make_latent_dataset
from tests.tiny_models import make_tiny_text_encoder, make_tiny_vae

NAME = "spanned"
STEPS, CHECKPOINT_EVERY = 200, 10  # about 12 steps/s on an idle 2-core machine: the crash comes mid-run
ENDED = ("SUCCEEDED", "FAILED", "STOPPED")


def _entrypoint(bucket: str, experiment: str, *, text_encoder: str, endpoint: str, mlflow_uri: str) -> str:
    # placement as a config file sets it (--config takes a JSON object too)
    args = ["python", "jobs/train_stage.py", "--config", json.dumps({"placement": "strict_spread"}),
            "--res", "32", "--latents", f"s3://{bucket}/latents", "--storage", f"s3://{bucket}/runs", "--name", NAME,
            "--model", "tiny", "--text-encoder", text_encoder, "--init-from", "none", "--steps", str(STEPS),
            "--warmup-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--ctx-length", "8",
            "--checkpoint-every", str(CHECKPOINT_EVERY), "--sample-every", str(STEPS), "--log-every", "1",
            "--workers", "2", "--max-failures", "3", "--s3-endpoint", endpoint, "--mlflow-uri", mlflow_uri,
            "--experiment", experiment]
    return shlex.join(args)


def _worker_nodes(dashboard: str) -> list[str]:
    """The nodes of the live Ray Train workers: "head", or the marker resource of the node they run on. Lists
    are filtered here: Ray's state API refuses a server-side filter that leaves out a dead node or actor."""
    from ray.util.state import list_actors, list_nodes

    names = {}
    for node in list_nodes(address=dashboard, limit=1000, raise_on_missing_output=False):
        markers = [r for r in node.resources_total if r.startswith("hdm_node_")]
        if node.state == "ALIVE":
            names[node.node_id] = markers[0] if markers else "head"
    actors = list_actors(address=dashboard, limit=10_000, raise_on_missing_output=False)
    return sorted(names.get(a.node_id, "gone") for a in actors
                  if a.state == "ALIVE" and "TrainWorker" in (a.class_name or ""))


def _registered_step(s3, bucket: str) -> int:
    """The step of the latest checkpoint Ray Train has registered (its snapshot in the run's storage: what a
    relaunch resumes from), 0 before the first."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    try:
        body = s3.get_object(Bucket=bucket, Key=f"runs/{NAME}/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}")["Body"].read()
    except s3.exceptions.NoSuchKey:
        return 0
    latest = json.loads(body).get("latest_checkpoint_result")
    return int(latest["metrics"]["step"]) if latest else 0


def _wait(what: str, predicate, timeout: float, status) -> None:
    """Until `predicate()`; fails when the job ends first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if status() in ENDED:
            raise AssertionError(f"the job ended ({status()}) while waiting for {what}")
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _wait_end(status, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while status() not in ENDED and time.monotonic() < deadline:
        time.sleep(2.0)
    return status()


def test_every_placement_is_a_ray_strategy():
    from ray.util.placement_group import VALID_PLACEMENT_GROUP_STRATEGIES

    assert set(PLACEMENT) == set(typing.get_args(TrainStageConfig.model_fields["placement"].annotation))
    assert set(PLACEMENT.values()) <= VALID_PLACEMENT_GROUP_STRATEGIES


@pytest.mark.integration
@pytest.mark.chaos
@pytest.mark.slow
def test_stage_spans_two_nodes_and_survives_losing_one(s3_server, mlflow_server, tmp_path, monkeypatch):
    import boto3
    from ray.job_submission import JobSubmissionClient

    # this test's own cluster: Ray's clients (job submission, state API) take $RAY_ADDRESS over the address
    # they are given, and .ci/run exports the session cluster's
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    started = time.monotonic()
    endpoint, uri = s3_server["HDM_S3_ENDPOINT"], mlflow_server["MLFLOW_TRACKING_URI"]
    # a bucket and an experiment of its own: the session's services may be shared (.ci/run) and rerun against
    bucket = experiment = f"hdm-two-nodes-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=bucket)
    text_encoder = str(make_tiny_text_encoder(tmp_path / "te"))
    make_latent_dataset(f"s3://{bucket}/latents", [32], 12, vae=str(make_tiny_vae(tmp_path / "vae")),
                        s3=S3Options(endpoint_url=endpoint))
    node_env = {k: v for k, v in s3_server.items() if k.startswith("AWS_")}  # credentials live on the nodes

    head = services.start_ray_head(num_cpus=1, env=node_env)
    nodes = []
    try:
        nodes.append(services.start_ray_node(head, num_cpus=1, env=node_env))
        dashboard = head.env["HDM_RAY_DASHBOARD"]
        client = JobSubmissionClient(dashboard)
        entrypoint = _entrypoint(bucket, experiment, text_encoder=text_encoder, endpoint=endpoint, mlflow_uri=uri)
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env={
            "working_dir": str(ROOT), "excludes": [".git", ".venv", "runs", "__pycache__", ".hdm"],
            "env_vars": {"HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}})
        status = lambda: client.get_job_status(job_id).value  # noqa: E731

        # one worker on each node (with fractional CPU requests, "pack" puts both on the head)
        _wait("two train workers", lambda: len(_worker_nodes(dashboard)) == 2, 300, status)
        assert _worker_nodes(dashboard) == sorted(["head", nodes[0].env["HDM_RAY_NODE_RESOURCE"]])

        # a checkpoint registered, then the second node dies with its worker, and a new node joins
        _wait("a registered checkpoint", lambda: _registered_step(s3, bucket) >= CHECKPOINT_EVERY, 300, status)
        registered = _registered_step(s3, bucket)
        services.kill(nodes[0])
        assert registered <= STEPS - 3 * CHECKPOINT_EVERY and status() not in ENDED, (
            f"training ran too fast to be interrupted (checkpoint at step {registered}, job {status()})")
        time.sleep(5)
        nodes.append(services.start_ray_node(head, num_cpus=1, env=node_env))

        # the relaunched worker group spans the head and the new node, and finishes
        _wait("the workers on the new node", lambda: _worker_nodes(dashboard) == sorted(
            ["head", nodes[1].env["HDM_RAY_NODE_RESOURCE"]]), 300, status)
        ended = _wait_end(status, 600)
        logs = client.get_job_logs(job_id)
    finally:
        for service in reversed([head, *nodes]):
            services.stop(service)
    assert ended == "SUCCEEDED", logs[-4000:]

    mlflow = MlflowClient(uri)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name(experiment).experiment_id])
    assert [r.info.run_name for r in runs] == [NAME]
    run = runs[0]
    assert run.info.status == "FINISHED"
    # resumed from the last checkpoint registered before the crash (or one registered while it was detected)
    resumed = int(run.data.tags[RESUMED_AT_TAG])
    assert resumed % CHECKPOINT_EVERY == 0 and registered <= resumed < STEPS, (resumed, registered)
    steps = collections.Counter(m.step for m in mlflow.get_metric_history(run.info.run_id, "loss"))
    doubled = sorted(s for s, n in steps.items() if n > 1)
    missing = sorted(set(range(1, STEPS + 1)) - set(steps))
    assert not doubled and not missing and len(steps) == STEPS, (
        f"loss steps logged twice: {doubled}; missing: {missing}; resumed at {resumed}")

    final = run.data.tags[CHECKPOINT_TAG]
    assert final.startswith(f"s3://{bucket}/runs/{NAME}/checkpoint_{STEPS:08d}_"), final
    key = final.removeprefix(f"s3://{bucket}/")
    stored = {o["Key"].removeprefix(key + "/") for o in s3.list_objects_v2(Bucket=bucket, Prefix=key + "/")["Contents"]}
    assert {checkpoint.WEIGHTS, checkpoint.META, checkpoint.TRAINING_STATE} <= stored, stored
    print(f"two nodes: {time.monotonic() - started:.0f} s; the node died after the checkpoint of step {registered} was "
          f"registered; resumed at step {resumed}; {STEPS} steps logged once")
