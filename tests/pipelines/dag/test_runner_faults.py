"""The DAG runner under faults, against real local services: SIGTERM, then Ctrl-C, while a stage job runs (the
job keeps running, the runs are KILLED, a rerun attaches to the same job, `--from` refuses meanwhile), and an MLflow
server that does not answer (exit 4, nothing submitted)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
from mlflow import MlflowClient
from ray.job_submission import JobStatus, JobSubmissionClient

import services
from pipelines.dag import jobs
from tests.pipelines.dag.test_pipeline_dag import ROOT, reduced_demo, run_pipeline

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

# data -> ingest -> vae, the VAE stage long enough (800 steps: 30 s to a few minutes here) that it still
# runs after the runner was stopped, `--from` was refused and the rerun started
SLOW_VAE = {"steps": 800, "log_every": 50}


def _small_dag(uri: str, name: str) -> dict:
    config = reduced_demo(uri, name, vae=SLOW_VAE)
    config["pipeline"]["name"] = name
    config["stages"] = {k: config["stages"][k] for k in ("data", "ingest", "vae")}
    return config


def _start_runner(config: dict, cluster: dict, storage) -> tuple[subprocess.Popen, list[str]]:
    """jobs/run_pipeline.py in the background, its output lines collected as they come."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "jobs/run_pipeline.py", json.dumps(config), "--storage", str(storage),
                             "--address", cluster["HDM_RAY_DASHBOARD"]], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    return proc, lines


def _wait_for(lines: list[str], pattern: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not any(re.search(pattern, line) for line in list(lines)):
        assert proc.poll() is None, "".join(lines)[-4000:]
        assert time.monotonic() < deadline, f"no {pattern!r} within {timeout:.0f} s:\n" + "".join(lines)[-4000:]
        time.sleep(0.5)


def test_sigterm_and_ctrl_c_leave_the_stage_job_running_a_rerun_attaches_and_from_refuses(ray_cluster,
                                                                                         mlflow_server, tmp_path):
    uri, name = mlflow_server["MLFLOW_TRACKING_URI"], f"attach-{uuid.uuid4().hex[:6]}"
    config, storage = _small_dag(uri, name), tmp_path / "runs"
    client, mlflow = JobSubmissionClient(ray_cluster["HDM_RAY_DASHBOARD"]), MlflowClient(uri)
    proc, lines = _start_runner(config, ray_cluster, storage)
    try:
        _wait_for(lines, r"^vae +\d+/800 steps", proc, timeout=600)  # its first progress line: the job opened its run
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        proc.kill()
    first = "".join(lines)
    job_id = re.search(r"\[vae\] submitted jobs/train_vae.py as Ray job (\S+)", first).group(1)
    assert re.fullmatch(rf"hdm-{name}-vae-[0-9a-f]{{12}}-1", job_id), job_id
    assert f"Ray job {job_id} keeps running" in first and f"ray job stop {job_id}" in first
    assert client.get_job_info(job_id).status in (JobStatus.PENDING, JobStatus.RUNNING)
    exp = mlflow.get_experiment_by_name(name)
    runs = {r.data.tags.get("hdm.dag.stage", "pipeline"): r for r in mlflow.search_runs([exp.experiment_id])}
    assert (runs["vae"].info.status, runs["pipeline"].info.status) == ("KILLED", "KILLED")
    assert runs["ingest"].info.status == "FINISHED"

    ingest_folder = runs["ingest"].data.tags["hdm.output.dataset"]
    refused = run_pipeline(config, ray_cluster, storage, "--from", "ingest")  # vae is downstream of ingest
    assert refused.returncode == 3, refused.output[-4000:]
    assert f"Ray job {job_id} of stage vae is RUNNING" in refused.stderr and f"ray job stop {job_id}" in refused.stderr
    assert os.path.isdir(ingest_folder)  # nothing deleted

    # Ctrl-C of a runner that attached: the same as SIGTERM, the job still runs
    proc, lines = _start_runner(config, ray_cluster, storage)
    try:
        _wait_for(lines, rf"\[vae\] attached to Ray job {job_id}", proc, timeout=300)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, "".join(lines)[-4000:]
    finally:
        proc.kill()
    assert f"Ray job {job_id} keeps running" in "".join(lines)
    assert client.get_job_info(job_id).status in (JobStatus.PENDING, JobStatus.RUNNING)
    assert [mlflow.get_run(runs[k].info.run_id).info.status for k in ("vae", "pipeline")] == ["KILLED", "KILLED"]

    rerun = run_pipeline(config, ray_cluster, storage)
    assert rerun.returncode == 0, rerun.output[-4000:]
    assert f"[vae] attached to Ray job {job_id}" in rerun.stdout and "submitted" not in rerun.stdout
    prefix = job_id[:-1]
    assert [j.submission_id for j in client.list_jobs() if (j.submission_id or "").startswith(prefix)] == [job_id]
    assert client.get_job_info(job_id).status == JobStatus.SUCCEEDED
    # the stage log is the job's log as Ray keeps it, from its start, nothing doubled by the two runners
    log = (storage / "_logs" / "vae.log").read_text()
    assert log.splitlines() == client.get_job_logs(job_id).splitlines()
    assert "step 800/800" in log and re.search(r"^vae +\d+/800 steps", first, re.M)
    vae = mlflow.get_run(runs["vae"].info.run_id)
    assert vae.info.status == "FINISHED" and vae.data.tags["hdm.dag.done"] == vae.data.tags["hdm.dag.digest"]
    steps = [m.step for m in mlflow.get_metric_history(vae.info.run_id, "train/grad_norm")]
    assert len(steps) == len(set(steps)) == 16  # every logged step once
    assert mlflow.get_run(runs["pipeline"].info.run_id).info.status == "FINISHED"


def test_unreachable_tracking_exits_4_within_seconds_and_submits_nothing(ray_cluster, tmp_path):
    closed = f"http://127.0.0.1:{services.free_port()}"  # nothing listens there
    config = _small_dag(closed, f"down-{uuid.uuid4().hex[:6]}")
    client = JobSubmissionClient(ray_cluster["HDM_RAY_DASHBOARD"])
    before = len(client.list_jobs())
    start = time.monotonic()
    result = run_pipeline(config, ray_cluster, tmp_path / "runs")
    assert time.monotonic() - start < 15
    assert result.returncode == 4, result.output[-4000:]
    assert result.stderr.strip().count("\n") == 0 and closed in result.stderr
    assert len(client.list_jobs()) == before and not (tmp_path / "runs").exists()


def test_the_address_given_wins_over_a_stale_ray_address_in_the_environment(ray_cluster, monkeypatch):
    """Ray's job client takes $RAY_ADDRESS over the address it is given (measured: `ray job submit --address B`
    with RAY_ADDRESS=A runs the job on A); the runner's client talks to the address it was given."""
    dashboard = ray_cluster["HDM_RAY_DASHBOARD"]
    closed = f"http://127.0.0.1:{services.free_port()}"  # the other cluster: nothing listens there
    monkeypatch.setenv("RAY_ADDRESS", closed)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(ConnectionError, match=closed.split("//")[1]):
        JobSubmissionClient(dashboard)  # Ray's own client went to the environment's address
    client = jobs.submission_client(dashboard)
    assert client.get_address() == dashboard
    assert isinstance(client.list_jobs(), list)
    assert os.environ["RAY_ADDRESS"] == closed and "RAY_API_SERVER_ADDRESS" not in os.environ  # left as found
