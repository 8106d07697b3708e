"""jobs/sample.py: the real command on a checkpoint directory written to the contract, tiny real models."""

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from hdm_model import XUTDenoiser, build_denoiser, read_parameters
from hdm_model.checkpoint import read_meta
from jobs import sample as sample_job

from tests.tiny_models import make_tiny_text_encoder, make_tiny_vae, write_tiny_checkpoint
from tests.pipelines.helpers import ROOT

SMALL = ["--width", "64", "--height", "48", "--steps", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A training-stage checkpoint directory: model.safetensors + config.json {model, text_encoder, vae, stage}."""
    root = tmp_path_factory.mktemp("sample")
    te_dir, vae_dir = make_tiny_text_encoder(root / "te"), make_tiny_vae(root / "vae")
    torch.manual_seed(0)
    directory = write_tiny_checkpoint(root / "ckpt", model=build_denoiser("tiny", ctx_dim=32), text_encoder=te_dir,
                                      vae=vae_dir, stage={"res": 256})
    (directory / "training_state.pt").write_bytes(b"not needed for sampling")
    return directory


def test_command_writes_pngs_with_their_parameters_and_a_grid(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red square\n\na photo of a cat\n")
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "jobs/sample.py", "--checkpoint", str(checkpoint), "--prompt-file",
                             str(prompts), "--seed", "10", "--count", "3", "--negative-prompt", "blurry",
                             "--x-shift", "0.25", "--cfg", "2.5", "--grid", "--out", str(out), "--device", "cpu",
                             *SMALL], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    pngs = sorted(out.glob("0*.png"))
    assert [p.name for p in pngs] == [f"{i:04d}-p{i // 3:02d}-s{10 + i % 3}.png" for i in range(6)]
    params = [read_parameters(p) for p in pngs]
    assert [(p["prompt"], p["seed"]) for p in params] == [(q, s) for q in ("red square", "a photo of a cat")
                                                          for s in (10, 11, 12)]
    first = params[0]
    assert first["negative_prompt"] == "blurry" and first["cfg_scale"] == 2.5 and first["steps"] == 2
    assert first["camera"] == {"zoom": 1.0, "x_shift": 0.25, "y_shift": 0.0}
    assert (first["width"], first["height"], first["model"]) == (64, 48, str(checkpoint))
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (3 * 64, 2 * 48)
    assert read_parameters(out / "grid.png")["images"] == params
    assert str(pngs[0]) in result.stdout


def test_help_documents_every_option(capsys):
    parser = sample_job.build_parser()
    with pytest.raises(SystemExit):
        sample_job.parse_args(["--help"])
    text = capsys.readouterr().out
    flags = [f for action in parser._actions for f in action.option_strings if f.startswith("--")]
    for action in parser._actions:
        assert action.help, action.option_strings
    for flag in flags:
        assert flag in text, flag
    required = ["--checkpoint", "--run-id", "--official", "--prompt", "--prompt-file", "--negative-prompt", "--width",
                "--height", "--steps", "--cfg", "--seed", "--count", "--zoom", "--x-shift", "--y-shift",
                "--cond-tread", "--uncond-tread", "--batch-size", "--dtype", "--device", "--text-encoder", "--vae",
                "--out", "--grid", "--mlflow-uri"]
    assert set(required) <= set(flags)


def test_flags_are_validated_at_the_edge(checkpoint, capsys):
    assert sample_job.main(["--checkpoint", str(checkpoint), "--prompt", "a", "--width", "72"]) == 2
    assert "multiples of 16" in capsys.readouterr().err
    assert sample_job.main(["--prompt", "a"]) == 2  # no source
    assert "exactly one of checkpoint, run_id, official" in capsys.readouterr().err
    assert sample_job.main(["--checkpoint", str(checkpoint)]) == 2  # no prompt
    config = sample_job.parse_args(["--official", "x.safetensors", "--prompt", "a", "--seed", "5", "--count", "2",
                                    "--mlflow-uri", "http://h:1", "--s3-endpoint", "http://h:2"])
    assert config.seeds == [5, 6] and config.tracking.uri == "http://h:1" and config.s3.endpoint_url == "http://h:2"


def test_refusals_are_reported(checkpoint, tmp_path, capsys):
    meta = read_meta(checkpoint)
    bare = write_tiny_checkpoint(tmp_path / "bare", model=XUTDenoiser.from_pretrained(checkpoint),
                                 text_encoder=meta.text_encoder, vae=None, stage={})
    assert sample_job.main(["--checkpoint", str(bare), "--prompt", "a", *SMALL, "--out", str(tmp_path)]) == 3
    assert "names no VAE" in capsys.readouterr().err
    assert sample_job.main(["--checkpoint", str(tmp_path / "nowhere"), "--prompt", "a", "--out", str(tmp_path)]) == 3
    assert "not a checkpoint directory" in capsys.readouterr().err


@pytest.mark.integration
def test_run_id_naming_an_s3_checkpoint(checkpoint, mlflow_server, s3_server, tmp_path):
    """The training stage's lineage: an MLflow run tagged hdm.checkpoint = s3://... -> images."""
    import boto3
    from mlflow import MlflowClient

    s3 = boto3.client("s3", endpoint_url=s3_server["HDM_S3_ENDPOINT"])
    s3.create_bucket(Bucket="ckpts")
    for path in checkpoint.iterdir():
        s3.upload_file(str(path), "ckpts", f"stage-256/final/{path.name}")
    uri = mlflow_server["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment(f"sample-{os.getpid()}-{tmp_path.name}"),
                            tags={"hdm.checkpoint": "s3://ckpts/stage-256/final"})
    out = tmp_path / "out"
    argv = ["--run-id", run.info.run_id, "--mlflow-uri", uri, "--s3-endpoint", s3_server["HDM_S3_ENDPOINT"],
            "--prompt", "red square", "--seed", "1", *SMALL, "--out", str(out)]
    assert sample_job.main(argv) == 0
    (png,) = out.glob("*.png")
    assert read_parameters(png)["model"] == f"s3://ckpts/stage-256/final (MLflow run {run.info.run_id})"
    untagged = client.create_run(run.info.experiment_id).info.run_id
    assert sample_job.main(argv[:1] + [untagged] + argv[2:]) == 3
