"""EQ-VAE training job end to end on a real local Ray cluster and MLflow server (integration)."""

from __future__ import annotations

import json

import pytest
import torch

from hdm_model import LatentVAE
from pipelines.train.config import VAETrainConfig

from tests.image_cases import smooth_images
from tests.pipelines.helpers import ray_job_submit

pytestmark = pytest.mark.integration
STEPS = 150
# The job's training fields, as flags below and as a VAETrainConfig in benchmarks/measure_test_margins.py.
# Seed and threads are explicit: the default thread count is the node's cores less one, split between workers.
JOB = dict(vae="tiny", crop_size=64, steps=STEPS, batch_size=8, lr=3e-3, weight_decay=0.0, grad_clip=1.0,
           workers=2, torch_threads=1, seed=0)


def write_images(root):
    """The job's input: 56 smooth images and one file that is not an image."""
    smooth_images(root, 56, sizes=(64, 80, 96))
    (root / "broken.png").write_bytes(b"not a png at all")
    return root


def as_flags(fields: dict) -> list[str]:
    """{"crop_size": 64} -> ["--crop-size", "64"]."""
    return [arg for key, value in fields.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("vae-images"))


def _train(**fields):
    from pipelines.train.eqvae import run_vae_training

    return run_vae_training(VAETrainConfig(**fields))


def eq_term_fields(images, work, *, seed: int, torch_threads: int) -> dict:
    """test_equivariance_term_lowers_the_equivariance_error's fields but p_eq and output (one worker)."""
    return dict(input=str(images), **{**JOB, "workers": 1, "seed": seed, "torch_threads": torch_threads},
                stats_images=16, tracking={"uri": f"sqlite:///{work}/mlflow.db"})


def test_tiny_vae_from_scratch_via_ray_job_submit(ray_cluster, mlflow_server, images, tmp_path):
    from mlflow import MlflowClient

    output = tmp_path / "vae"
    result = ray_job_submit(ray_cluster, [
        "jobs/train_vae.py", "--input", str(images), "--output", str(output), *as_flags(JOB),
        "--mlflow-uri", mlflow_server["MLFLOW_TRACKING_URI"], "--experiment", "test-vae"])
    assert result.returncode == 0, result.output[-4000:]
    assert "LPIPS off" in result.output and "input errors: {'not_an_image': 1}" in result.output

    client = MlflowClient(mlflow_server["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("test-vae").experiment_id])
    m = run.data.metrics
    gain = m["after/psnr"] - m["before/psnr"]
    # Held-out PSNR gain, measured for issue 14 with these fields over seeds 0-4 x 1 and 2 torch threads (10 runs,
    # benchmarks/measure_test_margins.py vae-job): 5.49-7.20 dB; this seed, 1 thread: 5.55 dB (5.53 at 3 threads).
    # One CI machine gave 5.30 dB under the old 6.0 bound. 4.0 leaves 1.5 dB below the lowest measured.
    assert gain >= 4.0, (m["before/psnr"], m["after/psnr"])
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


def test_p_eq_reaches_the_jobs_training(ray_driver, images, tmp_path):
    """p_eq = 1 transforms every batch the job trains on, p_eq = 0 none (the logged `train/eq`, 1 when a batch took
    the scale + rotation transform). Whether the term then lowers the equivariance error is a unit test
    (tests/hdm_model/test_eqvae.py): after the job's 150 steps the with / without ratio was 0.81-1.26 over
    seeds 0-4 x 1 and 2 threads, inside seed noise, so the job is not asked for it."""
    from mlflow import MlflowClient

    common = {**eq_term_fields(images, tmp_path, seed=3, torch_threads=1), "steps": 20, "log_every": 5}
    for p_eq in (1.0, 0.0):
        summary = _train(output=str(tmp_path / f"p{p_eq}"), p_eq=p_eq, **common)
        history = MlflowClient(common["tracking"]["uri"]).get_metric_history(summary.run_id, "train/eq")
        assert [m.step for m in history] == [5, 10, 15, 20]
        assert {m.value for m in history} == {p_eq}, p_eq
        assert summary.metrics["after/eq_error"] > 0


def test_the_moving_average_replaces_the_weights(ray_driver, images, tmp_path):
    """With --ema-decay the saved VAE and the held-out "after" metrics are the average's: a decay so close to 1
    that the average cannot leave the initial weights saves the seed's initial VAE (and scores it as before
    training), while the same 20 steps without it move every layer."""
    from hdm_model.eqvae import build_vae

    common = {**eq_term_fields(images, tmp_path, seed=3, torch_threads=1), "steps": 20, "log_every": 5}
    averaged = _train(output=str(tmp_path / "ema"), ema_decay=1 - 1e-9, **common)
    last = _train(output=str(tmp_path / "last"), **common)
    torch.manual_seed(3)  # the job's seed_init, then the named config: the weights training started from
    initial = build_vae("tiny").state_dict()

    def largest_change(folder: str) -> float:
        saved = LatentVAE.from_pretrained(folder).vae.state_dict()
        return max(float((saved[k] - v).abs().max()) for k, v in initial.items())

    assert largest_change(averaged.output) < 1e-5
    assert largest_change(last.output) > 1e-2
    assert averaged.metrics["after/psnr"] == pytest.approx(averaged.metrics["before/psnr"], abs=1e-3)
    assert last.metrics["after/psnr"] != pytest.approx(last.metrics["before/psnr"], abs=1e-3)
