"""jobs/evaluate.py and pipelines.eval.adherence.run_evaluation: tiny untrained checkpoint, real MLflow (sqlite)."""

import json
import subprocess
import sys

import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from hdm_model import build_denoiser
from jobs import evaluate as evaluate_job
from pipelines.eval.adherence import EvaluateConfig, run_evaluation
from pipelines.data.demo_data import COLORS, SHAPES, write_demo_data

from tests.tiny_models import make_tiny_text_encoder, make_tiny_vae, write_tiny_checkpoint
from tests.pipelines.helpers import ROOT


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A checkpoint directory written to the training contract, the demo's held-out prompts, and a sqlite
    MLflow store whose experiment keeps its artifacts under the temporary directory."""
    root = tmp_path_factory.mktemp("evaluate")
    te_dir, vae_dir = make_tiny_text_encoder(root / "te"), make_tiny_vae(root / "vae")
    torch.manual_seed(0)
    checkpoint = write_tiny_checkpoint(root / "ckpt", model=build_denoiser("tiny", ctx_dim=32), text_encoder=te_dir,
                                       vae=vae_dir, stage={"res": 32})
    prompts = write_demo_data(root / "data", count=1, size=32, holdout=1).heldout
    uri = f"sqlite:///{root}/mlflow.db"
    MlflowClient(uri).create_experiment("demo", artifact_location=str(root / "artifacts"))
    return {"checkpoint": checkpoint, "prompts": prompts, "uri": uri}


def test_command_scores_a_checkpoint_into_an_evaluate_run(setup, tmp_path):
    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, "jobs/evaluate.py", "--checkpoint", str(setup["checkpoint"]),
                             "--prompt-file", str(setup["prompts"]), "--seed", "0", "--count", "2", "--width", "32",
                             "--height", "32", "--steps", "2", "--out", str(out), "--device", "cpu",
                             "--mlflow-uri", setup["uri"], "--experiment", "demo"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "adherence.json").read_text())
    prompts = setup["prompts"].read_text().splitlines()
    assert len(report["images"]) == 2 * len(prompts) == 2 * len(COLORS)
    assert report["chance_color"] == pytest.approx(1 / len(COLORS))
    assert report["chance_shape"] == pytest.approx(1 / len(SHAPES))
    assert f"color {report['color']:.3f} (chance {1 / len(COLORS):.3f})" in result.stdout
    assert Image.open(out / "grid.png").size == (2 * 32, len(prompts) * 32)  # rows = prompts, columns = seeds

    client = MlflowClient(setup["uri"])
    run = client.search_runs([client.get_experiment_by_name("demo").experiment_id], "tags.`hdm.stage` = 'evaluate'")[0]
    assert run.info.status == "FINISHED" and run.data.tags["hdm.evaluated"] == str(setup["checkpoint"])
    assert run.data.metrics["adherence_color"] == pytest.approx(report["color"])
    assert run.data.metrics["adherence_shape"] == pytest.approx(report["shape"])
    assert float(run.data.params["adherence.chance_color"]) == pytest.approx(1 / len(COLORS))
    assert {a.path for a in client.list_artifacts(run.info.run_id, "adherence")} == \
        {"adherence/grid.png", "adherence/adherence.json"}


def test_run_id_scores_go_into_the_training_run(setup, tmp_path):
    client = MlflowClient(setup["uri"])
    experiment = client.get_experiment_by_name("demo").experiment_id
    training = client.create_run(experiment, tags={"hdm.stage": "train", "hdm.checkpoint": str(setup["checkpoint"])})
    client.set_terminated(training.info.run_id)
    config = EvaluateConfig(run_id=training.info.run_id, prompt_file=str(setup["prompts"]), seeds=[3], width=32,
                            height=32, steps=2, device="cpu", out=str(tmp_path), tracking={"uri": setup["uri"]})
    summary = run_evaluation(config)
    run = client.get_run(training.info.run_id)
    assert summary.run_id == training.info.run_id and run.info.status == "FINISHED"
    assert run.data.metrics["adherence_color"] == pytest.approx(summary.score.color)
    assert summary.score.images == len(COLORS) and len(summary.per_prompt) == len(COLORS)


def test_flags_and_refusals(setup, tmp_path):
    config = evaluate_job.parse_args(["--checkpoint", "ckpt", "--prompt-file", str(setup["prompts"]), "--seed", "5",
                                      "--count", "3", "--cfg", "2", "--parent-run-id", "p", "--mlflow-uri", "http://h"])
    assert config.seeds == [5, 6, 7] and config.cfg == 2 and config.tracking.parent_run_id == "p"
    with pytest.raises(ValueError, match="exactly one"):
        EvaluateConfig(prompt_file=str(setup["prompts"]))
    with pytest.raises(FileNotFoundError, match="no prompt file"):
        run_evaluation(EvaluateConfig(checkpoint="ckpt", prompt_file=str(tmp_path / "missing.txt")))
    other = tmp_path / "prompts.txt"
    other.write_text("a photo of a cat\n")
    with pytest.raises(ValueError, match="not a demo caption"):
        run_evaluation(EvaluateConfig(checkpoint=str(setup["checkpoint"]), prompt_file=str(other), out=str(tmp_path)))
