"""The detector on the demo VAE's reconstructions: the demo's own VAE stage (demo.toml's recipe, the real job on
the local Ray cluster) trained on the demo's images, then every colour x shape x background encoded and decoded by
it and read back. Slow (`make slow`): the job trains for about 3-4 minutes on 2 cores."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.pipelines.eval.detector_cases import clean_cases, reconstructed
from tests.pipelines.eval.test_detector import accuracy

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DEMO = Path(__file__).resolve().parents[3] / "pipelines" / "dag" / "configs" / "demo.toml"


@pytest.fixture(scope="module")
def demo_vae(ray_driver, tmp_path_factory):
    """The VAE `make demo` trains: demo.toml's data and vae stages, run by their jobs' functions."""
    from diffusers import AutoencoderKL

    from pipelines.data.demo_data import write_demo_data
    from pipelines.train.config import VAETrainConfig
    from pipelines.train.eqvae import run_vae_training

    work = tmp_path_factory.mktemp("demo-vae")
    stages = tomllib.loads(DEMO.read_text())["stages"]
    write_demo_data(work / "data", **stages["data"]["params"])
    summary = run_vae_training(VAETrainConfig(
        input=str(work / "data" / "images"), output=str(work / "vae"), **stages["vae"]["params"],
        tracking={"uri": f"sqlite:///{work}/mlflow.db"}))
    print(summary.format())
    return AutoencoderKL.from_pretrained(work / "vae").eval()


@pytest.mark.parametrize("size", [64, 32])
def test_vae_reconstructions_are_read_right(demo_vae, size):
    """64 px (the demo's images, and what eval-64 decodes) must read >= 0.95 colour and shape. At 32 px the
    4 x 4 latent rounds some squares' corners and triangles' tops into blobs a person reads as circles too
    (looked at), so shape is held to 0.8 there. 2026-12-05: trained on crops alone, this test's VAE once read
    64 px colour 0.889 (green as cyan, blue and purple swapped); with demo.toml's whole-image steps it passed,
    and the VAEs of three fresh-clone demo runs read 64 px colour 1.000 (benchmarks/RESULTS.md)."""
    color, shape = accuracy(reconstructed(demo_vae, clean_cases(size=size, per_scene=2, seed=1)))
    assert color >= 0.95 and shape >= (0.95 if size == 64 else 0.8), (size, color, shape)
