"""EQ-VAE training job end to end on a real local Ray cluster and MLflow server (integration)."""

from __future__ import annotations

import json

import pytest
import torch

from hdm_model import LatentVAE
from pipelines.configs import VAETrainConfig

from ..image_cases import smooth_images
from .helpers import ray_job_submit

pytestmark = pytest.mark.integration
STEPS = 150


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae-images")
    smooth_images(root, 56, sizes=(64, 80, 96))
    (root / "broken.png").write_bytes(b"not a png at all")
    return root



def _train(**fields):
    from pipelines.vae_training import run_vae_training

    return run_vae_training(VAETrainConfig(**fields))


def test_tiny_vae_from_scratch_via_ray_job_submit(ray_cluster, mlflow_server, images, tmp_path):
    from mlflow import MlflowClient

    output = tmp_path / "vae"
    result = ray_job_submit(ray_cluster, [
        "jobs/train_vae.py", "--input", str(images), "--output", str(output), "--vae", "tiny", "--crop-size", "64",
        "--steps", str(STEPS), "--batch-size", "8", "--lr", "3e-3", "--weight-decay", "0", "--grad-clip", "1.0",
        "--workers", "2", "--mlflow-uri", mlflow_server["MLFLOW_TRACKING_URI"], "--experiment", "test-vae"])
    assert result.returncode == 0, result.output[-4000:]
    assert "LPIPS off" in result.output and "input errors: {'not_an_image': 1}" in result.output

    client = MlflowClient(mlflow_server["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("test-vae").experiment_id])
    m = run.data.metrics
    gain = m["after/psnr"] - m["before/psnr"]
    assert gain >= 6.0, (m["before/psnr"], m["after/psnr"])
    assert run.data.params["steps"] == str(STEPS) and run.data.params["vae"] == "tiny"
    assert m["input_errors/not_an_image"] == 1
    history = client.get_metric_history(run.info.run_id, "train/rec")
    assert len(history) == STEPS // 10 and history[-1].value < history[0].value
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "reconstructions")}
    assert artifacts == {"reconstructions/before.png", "reconstructions/after.png"}
    assert run.info.status == "FINISHED"

    # the saved VAE carries its latent statistics, and the wrapper uses them
    config = json.loads((output / "config.json").read_text())
    vae = LatentVAE.from_pretrained(str(output))
    torch.testing.assert_close(vae.mean.flatten(), torch.tensor(config["latents_mean"]))
    torch.testing.assert_close(vae.std.flatten(), torch.tensor(config["latents_std"]))
    assert all(s > 0 for s in config["latents_std"]) and len(config["latents_mean"]) == 4


def test_equivariance_term_lowers_the_equivariance_error(ray_driver, images, tmp_path):
    """Same seed, data and steps; the EQ term on every batch vs never. Measured here: 0.68 vs 0.74 (-8%)
    after 150 steps; 0.59 vs 0.68 (-14%) after 300 steps at p_eq = 0.5. The assertion asks for lower."""
    common = dict(input=str(images), vae="tiny", crop_size=64, steps=STEPS, batch_size=8, lr=3e-3,
                  weight_decay=0.0, grad_clip=1.0, seed=3, stats_images=16, workers=1,
                  tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db"})
    with_eq = _train(output=str(tmp_path / "eq"), p_eq=1.0, **common).metrics
    without = _train(output=str(tmp_path / "plain"), p_eq=0.0, **common).metrics
    print(f"eq_error with EQ {with_eq['after/eq_error']:.4f}, without {without['after/eq_error']:.4f}; "
          f"PSNR {with_eq['after/psnr']:.2f} vs {without['after/psnr']:.2f}")
    assert with_eq["after/eq_error"] < without["after/eq_error"]
