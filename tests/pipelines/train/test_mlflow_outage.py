"""Tracking faults during a training stage, run by the real job path (`ray job submit` of jobs/train_stage.py
on the session's Ray cluster): a worker SIGKILLed mid-run (pipelines.faults, `train.kill`) and resumed by Ray
Train, and the MLflow server stopped for 60 s mid-stage then restarted on its port and store. Either way the
stage finishes with its step count and its run holds every logged step exactly once, status FINISHED. And a
stage stopped with `ray job stop` leaves its run KILLED, never RUNNING."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections import Counter

import pytest
from mlflow import MlflowClient
from ray.job_submission import JobSubmissionClient

import services  # infra/local/services.py (tests/conftest.py puts it on the path)
from pipelines.tracking import METRICS_DROPPED_TAG, RESUMED_AT_TAG
from tests.pipelines.helpers import BIN, ROOT, ray_job_submit
from tests.pipelines.latent_fixtures import make_latent_dataset
from tests.tiny_models import make_tiny_text_encoder, make_tiny_vae

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"te": str(make_tiny_text_encoder(root / "te")), "vae": str(make_tiny_vae(root / "vae"))}


def _stage(tmp_path, models: dict, uri: str, experiment: str, *, steps: int, log_every: int,
           checkpoint_every: int) -> list[str]:
    make_latent_dataset(str(tmp_path / "latents"), [32], 16, vae=models["vae"])
    return ["jobs/train_stage.py", "--res", "32", "--latents", str(tmp_path / "latents"), "--storage",
            str(tmp_path / "runs"), "--model", "tiny", "--text-encoder", models["te"], "--init-from", "none",
            "--steps", str(steps), "--warmup-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--ctx-length", "8",
            "--checkpoint-every", str(checkpoint_every), "--sample-every", "100000", "--log-every", str(log_every),
            "--workers", "2", "--max-failures", "2", "--mlflow-uri", uri, "--experiment", experiment]


def _the_run(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return runs[0] if runs else None


def _logged_steps(client: MlflowClient, run_id: str, key: str = "loss") -> Counter:
    return Counter(m.step for m in client.get_metric_history(run_id, key))


def test_a_killed_worker_resumes_and_logs_each_step_once(ray_cluster, mlflow_server, models, tmp_path):
    """A rank SIGKILLed right after its optimizer step 7 (once, whichever rank gets there first); checkpoints
    every 5 steps: Ray Train relaunches from step 5's, and the relaunched rank 0 skips the steps the run has."""
    uri, steps = mlflow_server["MLFLOW_TRACKING_URI"], 20
    faults = {"train.kill": {"keys": ["step7"], "times": 1, "state": str(tmp_path / "faults")}}
    result = ray_job_submit(ray_cluster, _stage(tmp_path, models, uri, "kill-resume", steps=steps, log_every=1,
                                                checkpoint_every=5), env_vars={"HDM_FAULTS": json.dumps(faults)})
    assert result.returncode == 0, result.output[-4000:]
    assert (tmp_path / "faults" / "train.kill.0").exists(), "the fault never fired"
    assert f"[train-32] step {steps}/{steps}" in result.output
    client = MlflowClient(uri)
    run = _the_run(client, "kill-resume")
    for key in ("loss", "lr", "grad_norm"):
        logged = _logged_steps(client, run.info.run_id, key)
        assert sorted(logged) == list(range(1, steps + 1)) and set(logged.values()) == {1}, (key, logged)
    # relaunched from the checkpoint at step 5 (the only one before 7), unless its report had not reached the
    # controller yet (then from scratch: the steps this job logged are skipped all the same)
    assert run.data.tags.get(RESUMED_AT_TAG, "5") == "5"
    assert run.info.status == "FINISHED"


def _ray_job(cluster: dict, command: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`ray job <command> <args>` against the test cluster (the CLI a user types)."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([str(BIN / "ray"), "job", command, "--address", cluster["HDM_RAY_DASHBOARD"], *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_ray_job_stop_marks_the_run_killed(ray_cluster, mlflow_server, models, tmp_path):
    """`ray job stop` (SIGTERM to the entrypoint, SIGKILL 3 s later) once the stage has logged steps: its run
    is KILLED, not left RUNNING."""
    uri, job_id = mlflow_server["MLFLOW_TRACKING_URI"], f"hdm-test-stop-{uuid.uuid4().hex[:8]}"
    stage = _stage(tmp_path, models, uri, "job-stop", steps=100000, log_every=1, checkpoint_every=100000)
    submitted = _ray_job(ray_cluster, "submit", "--no-wait", "--submission-id", job_id, "--working-dir", str(ROOT),
                         "--", "python", *stage)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    jobs = JobSubmissionClient(ray_cluster["HDM_RAY_DASHBOARD"])
    try:
        _stop_mid_run(ray_cluster, jobs, job_id, MlflowClient(uri))
    finally:  # a 100000-step job never outlives a failed test
        jobs.stop_job(job_id)


def _stop_mid_run(ray_cluster: dict, jobs: JobSubmissionClient, job_id: str, client: MlflowClient) -> None:
    deadline, run = time.monotonic() + 400, None
    while time.monotonic() < deadline and not jobs.get_job_status(job_id).is_terminal():
        run = _the_run(client, "job-stop")
        if run is not None and len(_logged_steps(client, run.info.run_id)) >= 3:
            break
        time.sleep(1)
    else:
        pytest.fail(f"no steps logged: {jobs.get_job_logs(job_id)[-4000:]}")
    assert run.info.status == "RUNNING"
    stopped = _ray_job(ray_cluster, "stop", job_id)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    # marked by the SIGTERM handler itself: the Terminated it raises may be swallowed inside Ray's blocking wait
    assert client.get_run(run.info.run_id).info.status == "KILLED", jobs.get_job_logs(job_id)[-4000:]

@pytest.mark.slow
def test_the_stage_outlives_a_60s_mlflow_outage(ray_cluster, models, tmp_path):
    """The server stopped (by PID) once the stage has logged 10 steps, restarted 60 s later on the same port and
    store: training went on meanwhile (steps stamped inside the outage), the buffered steps arrived after it."""
    root, steps = tmp_path / "mlflow", 300
    server = services.start_mlflow(root=root)
    uri = server.env["MLFLOW_TRACKING_URI"]
    port = int(uri.rsplit(":", 1)[1])
    outcome: dict = {}
    job = threading.Thread(target=lambda: outcome.update(result=ray_job_submit(
        ray_cluster, _stage(tmp_path, models, uri, "outage", steps=steps, log_every=1, checkpoint_every=50),
        timeout=900)), daemon=True)
    job.start()
    client = MlflowClient(uri)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and job.is_alive():
        run = _the_run(client, "outage")
        if run is not None and max(_logged_steps(client, run.info.run_id), default=0) >= 10:
            break
        time.sleep(1)
    assert job.is_alive(), outcome["result"].output[-4000:]
    stopped_ms = int(time.time() * 1000)
    services.stop(server)
    try:
        time.sleep(60)
    finally:
        restarted_ms = int(time.time() * 1000)
        server = services.start_mlflow(root=root, port=port)
    try:
        job.join(timeout=900)
        result = outcome["result"]
        assert result.returncode == 0, result.output[-4000:]
        assert f"[train-32] step {steps}/{steps}" in result.output
        run = client.get_run(run.info.run_id)
        history = client.get_metric_history(run.info.run_id, "loss")
        logged = Counter(m.step for m in history)
        assert sorted(logged) == list(range(1, steps + 1)) and set(logged.values()) == {1}
        during = [m.step for m in history if stopped_ms + 2000 < m.timestamp < restarted_ms]
        assert len(during) >= 5, f"training stalled while MLflow was down: {during}"
        assert run.info.status == "FINISHED" and METRICS_DROPPED_TAG not in run.data.tags
    finally:
        services.stop(server)
