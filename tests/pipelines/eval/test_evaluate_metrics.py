"""jobs/evaluate.py with every metric on, into a real MLflow server: FID (random Inception-v3 weights in a
torchvision-layout file, the demo's images as the reference), CLIP score (a tiny CLIP folder) and adherence."""

import json
import os
import subprocess
import sys

import pytest
import torch
from mlflow import MlflowClient

from hdm_model import build_denoiser
from pipelines.data.demo_data import write_demo_data
from pipelines.eval import metrics

from tests.pipelines.eval.eval_models import make_tiny_clip, save_random_inception
from tests.pipelines.helpers import ROOT
from tests.tiny_models import make_tiny_text_encoder, make_tiny_vae, write_tiny_checkpoint

pytestmark = pytest.mark.integration


def test_every_metric_lands_in_the_stage_run(mlflow_server, tmp_path):
    te_dir, vae_dir = make_tiny_text_encoder(tmp_path / "te"), make_tiny_vae(tmp_path / "vae")
    torch.manual_seed(0)
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt", model=build_denoiser("tiny", ctx_dim=32), text_encoder=te_dir,
                                       vae=vae_dir, stage={"res": 32})
    data = write_demo_data(tmp_path / "data", count=6, size=32, holdout=1)
    prompts = tmp_path / "prompts.txt"  # three of the held-out demo captions: 3 images with one seed
    prompts.write_text("".join(data.heldout.read_text().splitlines(keepends=True)[:3]))
    weights = save_random_inception(tmp_path / "inception_v3_google-random.pth")
    out, uri, experiment = tmp_path / "out", mlflow_server["MLFLOW_TRACKING_URI"], "evaluate-metrics"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", XDG_CACHE_HOME=str(tmp_path / "cache"))
    command = [sys.executable, "jobs/evaluate.py", "--checkpoint", str(checkpoint), "--prompt-file", str(prompts),
               "--seed", "0", "--width", "32", "--height", "32", "--steps", "2", "--device", "cpu", "--out", str(out),
               "--reference", str(tmp_path / "data" / "images"), "--inception", str(weights),
               "--inception-variant", "torchvision", "--clip-model", str(make_tiny_clip(tmp_path / "clip")),
               "--mlflow-uri", uri, "--experiment", experiment]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr

    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                             "tags.`hdm.stage` = 'evaluate'")[0]
    report = json.loads((out / "evaluation.json").read_text())
    assert run.info.status == "FINISHED" and set(run.data.metrics) == set(metrics.EVAL_METRICS)
    assert {k: run.data.metrics[k] for k in metrics.EVAL_METRICS} == pytest.approx(report["metrics"])
    assert report["metrics"][metrics.FID] > 0 and 0 <= report["metrics"][metrics.CLIP_SCORE] <= 100
    assert report["fid_reference_images"] == 6 and len(report["images"]) == 3
    assert run.data.params["evaluate.inception_variant"] == "torchvision"
    assert [h.step for h in client.get_metric_history(run.info.run_id, metrics.FID)] == [0]
    assert len(list((tmp_path / "cache" / "hdm" / "fid").glob("*.npz"))) == 1  # the reference, for the next stage
