"""jobs/evaluate.py and pipelines.eval.evaluate.run_evaluation: tiny untrained checkpoint, real MLflow (sqlite)."""

import json
import subprocess
import sys

import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from hdm_model import build_denoiser
from jobs import evaluate as evaluate_job
from pipelines.eval.evaluate import EvaluateConfig, run_evaluation
from pipelines.data.demo_data import COLORS, SHAPES, write_demo_data

from tests.pipelines.eval.eval_models import make_tiny_clip
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
    report = json.loads((out / "evaluation.json").read_text())
    prompts = setup["prompts"].read_text().splitlines()
    assert len(report["images"]) == 2 * len(prompts) == 2 * len(COLORS)
    assert report["chance_color"] == pytest.approx(1 / len(COLORS))
    assert report["chance_shape"] == pytest.approx(1 / len(SHAPES))
    assert f"color {report['color']:.3f} (chance {1 / len(COLORS):.3f})" in result.stdout
    assert Image.open(out / "grid.png").size == (2 * 32, len(prompts) * 32)  # rows = prompts, columns = seeds
    for i, row in enumerate(report["images"]):  # each row names its image: prompt-major, seeds 0 and 1
        assert row["image"] == f"{i:04d}-p{i // 2:02d}-s{i % 2}.png" and (out / row["image"]).is_file()
        assert row["prompt"] == prompts[i // 2]

    client = MlflowClient(setup["uri"])
    run = client.search_runs([client.get_experiment_by_name("demo").experiment_id], "tags.`hdm.stage` = 'evaluate'")[0]
    assert run.info.status == "FINISHED" and run.data.tags["hdm.evaluated"] == str(setup["checkpoint"])
    assert run.data.metrics["adherence_color"] == pytest.approx(report["color"])
    assert run.data.metrics["adherence_shape"] == pytest.approx(report["shape"])
    assert float(run.data.params["adherence.chance_color"]) == pytest.approx(1 / len(COLORS))
    assert run.data.metrics.keys() == {"adherence_color", "adherence_shape"}  # no FID, no CLIP score asked for
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")} == \
        {"evaluation/grid.png", "evaluation/evaluation.json"}


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
    with pytest.raises(ValueError, match="reference needs inception"):
        EvaluateConfig(checkpoint="ckpt", prompt_file="p.txt", reference="ref/")
    other = tmp_path / "prompts.txt"
    other.write_text("a photo of a cat\n")
    with pytest.raises(ValueError, match="not a demo caption"):
        run_evaluation(EvaluateConfig(checkpoint=str(setup["checkpoint"]), prompt_file=str(other), out=str(tmp_path),
                                      adherence=True))
    with pytest.raises(ValueError, match="nothing to measure"):  # any prompts work, but something must be measured
        run_evaluation(EvaluateConfig(checkpoint=str(setup["checkpoint"]), prompt_file=str(other), out=str(tmp_path)))


def test_any_prompts_get_a_clip_score_without_adherence(setup, tmp_path):
    """Prompts that are not demo captions: adherence turns itself off; the CLIP score of a tiny CLIP loaded by
    path (as a hub id) is the mean of the per-image scores in evaluation.json."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nthe quick brown fox\n")
    config = EvaluateConfig(checkpoint=str(setup["checkpoint"]), prompt_file=str(prompts), seeds=[0, 1], width=32,
                            height=32, steps=2, device="cpu", out=str(tmp_path / "out"), tracking={"uri": setup["uri"]},
                            clip_model=str(make_tiny_clip(tmp_path / "clip")))
    summary = run_evaluation(config)
    report = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert summary.metrics.keys() == {"clip_score"} and summary.score is None
    drawn = [(p, s) for p in ("a photo of a cat", "the quick brown fox") for s in (0, 1)]  # prompt-major
    assert [(r["prompt"], r["seed"]) for r in report["images"]] == drawn
    assert summary.metrics["clip_score"] == pytest.approx(sum(r["clip_score"] for r in report["images"]) / 4, abs=1e-3)
    assert report["settings"]["clip_model"] == config.clip_model and report["settings"]["images"] == 4
    run = MlflowClient(setup["uri"]).get_run(summary.run_id)
    assert run.data.metrics == {"clip_score": pytest.approx(summary.metrics["clip_score"])}
    assert run.data.params["evaluate.clip_model"] == config.clip_model
