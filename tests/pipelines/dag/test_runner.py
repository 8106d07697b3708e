"""The DAG runner without services: what a job may carry (forward_env), where tracked jobs reach MLflow
(cluster_uri), its submission ids, and its stage log redacted line by line."""

from __future__ import annotations

import io

import pytest
from pydantic import ValidationError

from pipelines.dag import jobs
from pipelines.dag.spec import DagConfig, job_config, plan
from pipelines.secrets import MASK, is_secret_name

STAGES = {
    "ingest": {"kind": "ingest", "params": {"url_list": "/data/urls.parquet"}},
    "precompute": {"kind": "precompute", "needs": ["ingest"], "params": {"resolutions": [64], "vae": "tiny"}},
    "train-64": {"kind": "train", "needs": ["precompute"], "params": {"res": 64, "model": "tiny", "steps": 10}},
}


def _config(**pipeline) -> DagConfig:
    return DagConfig.model_validate({"pipeline": {"name": "t", "storage": "/data/t", **pipeline}, "stages": STAGES})


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN",
                                  "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"])
def test_forward_env_refuses_credentials_and_says_where_they_belong(name):
    with pytest.raises(ValidationError) as e:
        _config(forward_env=["AWS_DEFAULT_REGION", name])
    assert f"{name}: a credential is never forwarded" in str(e.value)
    assert "docs/node.md, docs/kubernetes.md" in str(e.value)


def test_forward_env_default_carries_no_secret_and_skips_what_is_unset(monkeypatch):
    config = _config()
    assert config.pipeline.forward_env == ["AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "HF_HUB_OFFLINE",
                                           "NO_ALBUMENTATIONS_UPDATE"]
    assert not any(is_secret_name(n) for n in config.pipeline.forward_env)
    for name in ("AWS_REGION", "AWS_PROFILE", "NO_ALBUMENTATIONS_UPDATE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hdm-fake-not-forwarded")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert jobs.job_env(config) == {"AWS_DEFAULT_REGION": "eu-west-1", "HF_HUB_OFFLINE": "1",
                                    "NO_ALBUMENTATIONS_UPDATE": "1"}
    assert _config(forward_env=["HDM_FAULTS"]).pipeline.forward_env == ["HDM_FAULTS"]  # not a secret: allowed


def test_cluster_uri_is_what_tracked_jobs_get():
    inside = "http://mlflow.hdm.svc.cluster.local:5000"
    config = _config(tracking={"uri": "http://127.0.0.1:5000", "cluster_uri": inside})
    stages = {s.name: s for s in plan(config)}
    outputs = {"ingest": {"dataset": "/d"}, "precompute": {"latents": "/l"}}
    train = job_config(config, stages["train-64"], outputs, tracking_uri="http://127.0.0.1:5000", parent_run_id="p")
    assert train["tracking"]["uri"] == inside
    assert "tracking" not in job_config(config, stages["precompute"], outputs, tracking_uri="x", parent_run_id="p")
    plain = _config(tracking={"uri": "http://127.0.0.1:5000"})
    train = job_config(plain, {s.name: s for s in plan(plain)}["train-64"], outputs,
                       tracking_uri="http://127.0.0.1:5000", parent_run_id="p")
    assert train["tracking"]["uri"] == "http://127.0.0.1:5000"
    # the cluster URI is not part of a stage's digest: the same stage whichever way MLflow is reached
    assert [s.digest for s in plan(config)] == [s.digest for s in plan(plain)]


def test_submission_ids_are_stage_digest_and_attempt():
    config = _config()
    stage = {s.name: s for s in plan(config)}["train-64"]
    assert jobs.job_prefix("t", stage) == f"hdm-t-train-64-{stage.digest[:12]}-"


class _Logs:
    """The one method of JobSubmissionClient that `jobs.tail` calls, yielding the given chunks."""

    def __init__(self, chunks: list[str]):
        self.chunks = chunks

    async def tail_job_logs(self, job_id: str):
        for chunk in self.chunks:
            yield chunk


def test_stage_log_is_redacted_line_by_line_even_when_a_secret_spans_two_chunks(monkeypatch):
    secret = "hdm-fake-0123456789abcdef"
    monkeypatch.setenv("HF_TOKEN", secret)
    chunks = ["step 1\nthe token is hdm-fake-0123", "456789abcdef, ok\nhalf a line", " and its end"]
    sink, said = io.StringIO(), []
    jobs.tail(_Logs(chunks), "job", sink, said.append)
    assert sink.getvalue() == f"step 1\nthe token is {MASK}, ok\nhalf a line and its end\n"
    assert said == ["step 1", f"the token is {MASK}, ok", "half a line and its end"]



@pytest.mark.parametrize("cluster_uri, runner_uri", [("http://hdm:hdm-fake-pw@mlflow:5000", "http://127.0.0.1:5000"),
                                                     (None, "https://hdm:hdm-fake-pw@mlflow.example.com")])
def test_a_tracking_uri_with_a_password_never_reaches_a_job_config(cluster_uri, runner_uri):
    config = _config(tracking={"cluster_uri": cluster_uri})
    train = {s.name: s for s in plan(config)}["train-64"]
    outputs = {"ingest": {"dataset": "/d"}, "precompute": {"latents": "/l"}}
    with pytest.raises(ValueError, match="a password in the URI would be shown in the Ray job list") as e:
        job_config(config, train, outputs, tracking_uri=runner_uri, parent_run_id="p")
    assert "hdm-fake-pw" not in str(e.value) and "MLFLOW_TRACKING_PASSWORD" in str(e.value)
