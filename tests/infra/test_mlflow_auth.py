"""MLflow behind its basic-auth app, as the node and Kubernetes run it: a real local server refuses a client
without credentials (401) or with a wrong password, and our StageRun, given the credentials the way a
cluster node gives them (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in its environment), creates
a run, logs a metric and reads it back."""

from __future__ import annotations

import secrets
import time
import urllib.error
import urllib.request

import pytest

import services

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

USER = "hdm-pipeline"


@pytest.fixture(scope="module")
def auth_mlflow():
    """An MLflow server of its own with basic auth; (its URI, its admin's password)."""
    password = secrets.token_hex(12)
    server = services.start_mlflow(auth=(USER, password))
    try:
        yield server.env["MLFLOW_TRACKING_URI"], password
    finally:
        services.stop(server)


def status_of(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_server_refuses_clients_without_credentials(auth_mlflow, monkeypatch):
    from mlflow import MlflowClient

    uri, _ = auth_mlflow
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert status_of(f"{uri}/health") == 200  # probes need no login
    assert status_of(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1") == 401
    with pytest.raises(Exception, match="401"):
        MlflowClient(tracking_uri=uri).create_experiment("hdm-no-login")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secrets.token_hex(12))
    with pytest.raises(Exception, match="401"):
        MlflowClient(tracking_uri=uri).create_experiment("hdm-wrong-password")


def test_stage_run_logs_with_credentials_from_the_environment(auth_mlflow, monkeypatch):
    from mlflow import MlflowClient

    from pipelines.tracking import StageRun

    uri, password = auth_mlflow
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    run = StageRun.open(tracking_uri=uri, experiment="hdm-auth", stage_key="auth-check", run_name="auth-check")
    assert run.enabled
    run.log_metrics({"loss": 0.25}, step=7)
    history = []
    deadline = time.monotonic() + 60  # metrics may be sent by a background thread
    while not history and time.monotonic() < deadline:
        history = MlflowClient(tracking_uri=uri).get_metric_history(run.run_id, "loss")
        time.sleep(0.2)
    assert [(m.step, m.value) for m in history] == [(7, 0.25)]
    run.finish()
    assert MlflowClient(tracking_uri=uri).get_run(run.run_id).info.status == "FINISHED"

    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(Exception, match="401"):  # the same run, read without the password
        MlflowClient(tracking_uri=uri).get_run(run.run_id)
