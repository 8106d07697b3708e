"""Training stages end to end on a real local Ray cluster, MLflow server and moto S3 (integration)."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

import pytest
from mlflow import MlflowClient

from pipelines.train.config import TrainStageConfig

from tests.tiny_models import make_tiny_text_encoder, make_tiny_vae
from tests.pipelines.helpers import ray_job_submit
from tests.pipelines.latent_fixtures import make_latent_dataset

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"te": str(make_tiny_text_encoder(root / "te")), "vae": str(make_tiny_vae(root / "vae"))}


def _stage_args(res: int, latents: str, storage: str, models: dict, mlflow_uri: str, experiment: str, *extra):
    return ["jobs/train_stage.py", "--res", str(res), "--latents", latents, "--storage", storage, "--model", "tiny",
            "--text-encoder", models["te"], "--steps", "12", "--warmup-steps", "2", "--batch-size", "2",
            "--grad-accum", "1", "--ctx-length", "8", "--checkpoint-every", "6", "--sample-every", "6",
            "--log-every", "3", "--workers", "2", "--mlflow-uri", mlflow_uri, "--experiment", experiment, *extra]


def test_two_chained_stages_via_ray_job_submit_with_s3(ray_cluster, mlflow_server, s3_server, models, tmp_path):
    import boto3

    uri = mlflow_server["MLFLOW_TRACKING_URI"]
    s3 = boto3.client("s3", endpoint_url=s3_server["HDM_S3_ENDPOINT"])
    s3.create_bucket(Bucket="hdm-train")
    from pipelines.config import S3Options

    make_latent_dataset(str(tmp_path / "latents"), [32, 64], 12, vae=models["vae"])
    make_latent_dataset("s3://hdm-train/latents", [32, 64], 12, vae=models["vae"],
                        s3=S3Options(endpoint_url=s3_server["HDM_S3_ENDPOINT"]))
    env = {k: v for k, v in s3_server.items() if k.startswith("AWS_")}
    first = ray_job_submit(ray_cluster, _stage_args(32, str(tmp_path / "latents"), str(tmp_path / "runs"), models,
                                                    uri, "chain", "--init-from", "none"))
    assert first.returncode == 0, first.output[-4000:]
    second = ray_job_submit(ray_cluster, _stage_args(64, "s3://hdm-train/latents", "s3://hdm-train/runs", models, uri,
                                                     "chain", "--s3-endpoint", s3_server["HDM_S3_ENDPOINT"]),
                            env_vars=env)  # --init-from auto is the default
    assert second.returncode == 0, second.output[-4000:]
    assert "[train-64] step 12/12" in second.output

    client = MlflowClient(uri)
    runs = {r.data.tags["hdm.res"]: r for r in client.search_runs(
        [client.get_experiment_by_name("chain").experiment_id])}
    assert set(runs) == {"32", "64"}
    r32, r64 = runs["32"], runs["64"]
    assert r64.data.tags["hdm.prev_run"] == r32.info.run_id
    assert r64.data.tags["hdm.init_from"] == r32.data.tags["hdm.checkpoint"]
    assert r64.data.tags["hdm.init_weights_sha256"] == r32.data.tags["hdm.final_weights_sha256"]
    assert r64.data.tags["hdm.checkpoint"].startswith("s3://hdm-train/runs/train-64/checkpoint_")
    for run in (r32, r64):
        assert run.info.status == "FINISHED"
        samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
        assert samples == ["samples/step-0000006.png", "samples/step-0000012.png"]
    # The chain learns: the 64 px stage, started from the 32 px stage's final weights, trains at a lower loss
    # (steps 4-12) than the 32 px stage did at its start (steps 1-6), from the losses MLflow recorded. Measured
    # with these settings (local Ray, 2 workers, seeds 20090220 and 0-6): ratio 0.72-0.92, so the bound is 1.0.
    # 12 steps of 2 samples are too few for more: one stage's late / early loss ranged 0.77-1.12 over those
    # seeds. test_learning_two_caption_classes asserts learning with a wide margin.
    loss = {res: {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
            for res, run in (("32", r32), ("64", r64))}
    assert sorted(loss["32"]) == sorted(loss["64"]) == [1, 3, 6, 9, 12]
    assert _mean_loss(loss["64"], after=3) < _mean_loss(loss["32"], after=0, last=6), loss
    keys = s3.list_objects_v2(Bucket="hdm-train", Prefix="runs/train-64/")["Contents"]
    names = {k["Key"].rsplit("/", 1)[-1] for k in keys}
    assert {"model.safetensors", "training_state.pt", "config.json"} <= names


def _mean_loss(logged: dict[int, float], *, after: int, last: int | None = None) -> float:
    """Rank 0's mean loss per step over steps after+1..last (logged steps), from the logged values, each the
    mean over the steps since the previous logged step."""
    steps = sorted(logged)
    spans = {s: s - prev for prev, s in zip([0, *steps], steps)}  # steps each logged value averages
    chosen = [s for s in steps if after < s and (last is None or s <= last)]
    return sum(logged[s] * spans[s] for s in chosen) / sum(spans[s] for s in chosen)


def test_no_previous_stage_is_a_clear_error(ray_cluster, mlflow_server, models, tmp_path):
    make_latent_dataset(str(tmp_path / "latents"), [64], 4, vae=models["vae"])
    result = ray_job_submit(ray_cluster, _stage_args(64, str(tmp_path / "latents"), str(tmp_path / "runs"), models,
                                                     mlflow_server["MLFLOW_TRACKING_URI"], "lonely"))
    assert result.returncode != 0
    assert "--init-from auto found no finished training run below 64 px" in result.output



def test_worker_killed_mid_run_resumes_from_checkpoint(ray_cluster, ray_driver, mlflow_server, models, tmp_path):
    from ray.util.state import list_actors

    from pipelines.train.stage import run_training_stage

    uri = mlflow_server["MLFLOW_TRACKING_URI"]
    make_latent_dataset(str(tmp_path / "latents"), [32], 16, vae=models["vae"])
    config = TrainStageConfig(res=32, latents=str(tmp_path / "latents"), storage=str(tmp_path / "runs"), model="tiny",
                         text_encoder=models["te"], init_from="none", steps=30, warmup_steps=2, batch_size=2,
                         grad_accum=1, ctx_length=8, checkpoint_every=5, log_every=1, workers=2, max_failures=2,
                         sample={"every": 1000, "steps": 1, "seeds": [0]},
                         tracking={"uri": uri, "experiment": "faults"})
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=run_training_stage(config)), daemon=True)
    thread.start()
    client = MlflowClient(uri)
    deadline = time.monotonic() + 300
    killed = None
    while time.monotonic() < deadline and killed is None:
        time.sleep(1)
        exp = client.get_experiment_by_name("faults")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and runs[0].data.metrics.get("loss") is not None:
            steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
            if max(steps) >= 12:  # past two checkpoint steps (5, 10)
                workers = list_actors(address=ray_cluster["RAY_ADDRESS"],
                                      filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
                killed = workers[-1].pid
                os.kill(killed, signal.SIGKILL)
    assert killed is not None, "training never got past step 12"
    thread.join(timeout=400)
    assert result["summary"].metrics["step"] == 30
    (run,) = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    resumed = int(run.data.tags["hdm.resumed_at_step"])
    # From a checkpoint, not from scratch: a multiple of 5 (which one depends on how far the controller had
    # registered reports when the worker died), never a step that was not checkpointed.
    assert 5 <= resumed < 30 and resumed % 5 == 0, resumed
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert max(steps) == 30 and set(range(1, 31)) <= set(steps)  # the sequence continues after the restart
    assert run.info.status == "FINISHED"


@dataclass
class Learning:
    first: float  # the loss logged at step 1
    last: float  # the mean of the losses logged at steps 130, 140 and 150
    zero_loss: float  # what predicting v = 0 costs: E|eps - z0|^2 = 1 + E[z0^2]


def learn_two_caption_classes(models: dict, work, *, seed: int, torch_threads: int) -> Learning:
    """150 steps of the tiny model on two caption classes (latent_fixtures). Also run, over several seeds and
    thread counts, by benchmarks/measure_test_margins.py."""
    from pipelines.train.stage import run_training_stage

    uri = f"sqlite:///{work}/mlflow.db"
    mean_square = make_latent_dataset(str(work / "latents"), [64], 32, vae=models["vae"])
    config = TrainStageConfig(res=64, latents=str(work / "latents"), storage=str(work / "runs"), model="tiny",
                         text_encoder=models["te"], init_from="none", steps=150, warmup_steps=10, base_lr=0.5,
                         batch_size=8, grad_accum=1, ctx_length=8, caption_dropout=0.1, checkpoint_every=1000,
                         log_every=10, workers=1, torch_threads=torch_threads, seed=seed,
                         sample={"every": 10_000, "steps": 1, "seeds": [0]},
                         tracking={"uri": uri, "experiment": "learning"})
    summary = run_training_stage(config)
    history = {m.step: m.value for m in MlflowClient(uri).get_metric_history(summary.run_id, "loss")}
    return Learning(first=history[1], last=sum(history[s] for s in (130, 140, 150)) / 3, zero_loss=1.0 + mean_square)


def test_learning_two_caption_classes(ray_driver, models, tmp_path):
    """The loss falls well below its start and below predicting zero. Margins, measured for issue 14 with the
    per-rank seeded draws over seeds 0-4 x 1 and 2 torch threads (10 runs, benchmarks/measure_test_margins.py
    train-stage): last / first 0.363-0.391 (bound 0.6), last / predicting-zero 0.363-0.398 (bound 0.8): both
    bounds 1.5x above the worst run."""
    r = learn_two_caption_classes(models, tmp_path, seed=20090220, torch_threads=1)
    print(f"loss at step 1 {r.first:.3f}, final {r.last:.3f}, predicting zero {r.zero_loss:.2f}")
    assert r.last < 0.6 * r.first and r.last < 0.8 * r.zero_loss
