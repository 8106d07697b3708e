"""Guidance sweep (pipelines/eval/sweep.py): the grid walk on a deterministic evaluation, and the real path:
jobs/evaluate.py's sweep writes sampling.json into a tiny checkpoint (local and on a moto S3), and sampling
without a --cfg then uses it."""

import json

import boto3
import pytest
import torch
from mlflow import MlflowClient
from pydantic import ValidationError

from hdm_model import build_denoiser, read_parameters
from hdm_model.checkpoint import SAMPLING, SamplingDefaults, read_sampling_defaults
from jobs import evaluate as evaluate_job
from jobs import sample as sample_job
from pipelines.config import S3Options
from pipelines.data.demo_data import write_demo_data
from pipelines.eval import metrics as names
from pipelines import progress
from pipelines.eval.evaluate import EvaluateConfig, run_evaluation
from pipelines.eval.sampling import SampleConfig, run_sampling
from pipelines.eval.sweep import SweepGrid, run_sweep, write_sampling_defaults
from pipelines.storage import read_bytes, resolve, upload

from tests.tiny_models import make_tiny_text_encoder, make_tiny_vae, write_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
SEEDS = 1  # TINY samples each prompt with one seed
TINY = ["--seed", "0", "--width", "32", "--height", "32", "--steps", "2", "--device", "cpu"]


def table(values: dict[tuple[float, float], dict[str, float]]):
    """An evaluate_point that answers from `values` and records the order it was asked in."""
    asked = []

    def evaluate_point(cfg: float, uncond_tread: float) -> dict[str, float]:
        asked.append((cfg, uncond_tread))
        return values[cfg, uncond_tread]

    return evaluate_point, asked


def test_grid_order_logging_and_the_best_point():
    values = {(c, r): {names.ADHERENCE_COLOR: c / 10 - r, names.FID: 100 - c + 10 * r}
              for c in (1.0, 2.0, 3.0) for r in (0.0, 0.5)}
    evaluate_point, asked = table(values)
    logged = []
    result = run_sweep(SweepGrid(cfg=[1, 2, 3], uncond_tread=[0, 0.5]), evaluate_point=evaluate_point,
                       log_point=lambda i, p: logged.append((i, p.cfg, p.uncond_tread)))
    grid = [(1.0, 0.0), (1.0, 0.5), (2.0, 0.0), (2.0, 0.5), (3.0, 0.0), (3.0, 0.5)]  # cfg outer
    assert asked == grid and [(p.cfg, p.uncond_tread) for p in result.points] == grid
    assert logged == [(i, *point) for i, point in enumerate(grid)]
    assert result.metric == names.ADHERENCE_COLOR and result.points[4].metrics == values[3.0, 0.0]
    assert (result.best.cfg, result.best.uncond_tread) == (3.0, 0.0)  # highest adherence


def test_fid_is_lower_is_better_and_ties_keep_the_earlier_point():
    fid = {(1.0, 0.0): 30.0, (1.0, 0.3): 12.0, (4.0, 0.0): 12.0, (4.0, 0.3): 20.0}
    evaluate_point, _ = table({k: {names.FID: v, names.CLIP_SCORE: 10 * v} for k, v in fid.items()})
    result = run_sweep(SweepGrid(cfg=[1, 4], uncond_tread=[0, 0.3], metric="fid"), evaluate_point=evaluate_point)
    assert result.best is result.points[1] and result.best.metrics[names.FID] == 12.0
    evaluate_point, _ = table({k: {names.ADHERENCE_COLOR: 0.5} for k in fid})
    assert run_sweep(SweepGrid(cfg=[1, 4], uncond_tread=[0, 0.3]), evaluate_point=evaluate_point).best.cfg == 1.0


def test_a_nan_point_never_beats_a_measured_one():
    values = {(1.0, 0.0): {names.FID: float("nan")}, (2.0, 0.0): {names.FID: 50.0}, (3.0, 0.0): {names.FID: 60.0}}
    evaluate_point, _ = table(values)
    assert run_sweep(SweepGrid(cfg=[1, 2, 3], uncond_tread=[0], metric="fid"),
                     evaluate_point=evaluate_point).best.cfg == 2.0


def test_a_point_without_the_metric_is_refused_naming_it():
    evaluate_point, asked = table({(2.0, 0.0): {names.CLIP_SCORE: 30.0}})
    with pytest.raises(ValueError, match="cfg 2.0, uncond_tread 0.0 has no fid \\(it has clip_score\\)"):
        run_sweep(SweepGrid(cfg=[2, 3], uncond_tread=[0], metric="fid"), evaluate_point=evaluate_point)
    assert asked == [(2.0, 0.0)]  # stopped at the first such point


@pytest.mark.parametrize("grid, why", [
    ({"cfg": [], "uncond_tread": [0]}, "at least 1 item"),
    ({"cfg": [0.5], "uncond_tread": [0]}, "greater than or equal to 1"),
    ({"cfg": [2], "uncond_tread": [1.0]}, "less than 1"),
    ({"cfg": [2], "uncond_tread": [-0.1]}, "greater than or equal to 0"),
    ({"cfg": [2], "uncond_tread": [0], "metric": "loss"}, "unknown sweep metric 'loss': use one of adherence_color"),
])
def test_a_bad_grid_is_refused(grid, why):
    with pytest.raises(ValidationError, match=why):
        SweepGrid.model_validate(grid)


# --- the real path ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny checkpoint written to the training contract, the demo's held-out prompts (6), and a sqlite MLflow."""
    root = tmp_path_factory.mktemp("sweep")
    torch.manual_seed(0)
    checkpoint = write_tiny_checkpoint(root / "ckpt", model=build_denoiser("tiny", ctx_dim=32), stage={"res": 32},
                                       text_encoder=make_tiny_text_encoder(root / "te"), vae=make_tiny_vae(root / "vae"))
    prompts = write_demo_data(root / "data", count=1, size=32, holdout=1).heldout
    uri = f"sqlite:///{root}/mlflow.db"
    MlflowClient(uri).create_experiment("sweep", artifact_location=str(root / "artifacts"))
    return {"checkpoint": checkpoint, "prompts": prompts, "uri": uri}


def best_of(points: list[dict], metric: str) -> dict:
    """The sweep's rule, restated: the highest value, the earliest among equals."""
    return max(points, key=lambda p: (p[metric], -points.index(p)))


def test_evaluate_sweep_writes_the_best_point_and_sampling_uses_it(setup, tmp_path, capsys):
    checkpoint, out = setup["checkpoint"], tmp_path / "eval"
    code = evaluate_job.main(["--checkpoint", str(checkpoint), "--prompt-file", str(setup["prompts"]), *TINY,
                              "--sweep-cfg", "1.5", "3", "--sweep-uncond-tread", "0", "0.4", "--out", str(out),
                              "--mlflow-uri", setup["uri"], "--experiment", "sweep"])
    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err
    # a progress line per prompt and point, counting every image of the sweep (pipelines/progress.py)
    lines = [p for p in map(progress.parse, printed.out.splitlines()) if p is not None]
    prompts = len(setup["prompts"].read_text().splitlines())
    assert [p.done for p in lines] == [n * SEEDS for n in range(1, 4 * prompts + 1)]
    assert {(p.total, p.unit) for p in lines} == {(4 * prompts * SEEDS, "image")}
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert [(p["cfg"], p["uncond_tread"]) for p in points] == [(1.5, 0.0), (1.5, 0.4), (3.0, 0.0), (3.0, 0.4)]
    best = best_of(points, names.ADHERENCE_COLOR)
    defaults = read_sampling_defaults(checkpoint)
    assert (defaults.cfg_scale, defaults.uncond_tread_rate) == (best["cfg"], best["uncond_tread"])
    assert defaults.source.startswith("evaluate sweep: best adherence_color")
    assert f"best by adherence_color: cfg {best['cfg']}, uncond_tread {best['uncond_tread']}" in printed.out
    # each point's grid was sampled at its own settings
    assert read_parameters(out / "sweep" / "3" / "0000-p00-s0.png")["uncond_tread_rate"] == 0.4

    client = MlflowClient(setup["uri"])
    run = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])[0]
    history = client.get_metric_history(run.info.run_id, "sweep/adherence_color")
    assert [(m.step, m.value) for m in history] == [(i, pytest.approx(p["adherence_color"]))
                                                    for i, p in enumerate(points)]
    assert run.data.params["sweep.defaults_written"] == str(checkpoint / SAMPLING)

    summary = run_sampling(SampleConfig(checkpoint=str(checkpoint), prompts=["red square"], width=32, height=32,
                                        steps=2, device="cpu", out=str(tmp_path / "default")))
    drawn = read_parameters(summary.images[0])
    assert (drawn["cfg_scale"], drawn["uncond_tread_rate"]) == (best["cfg"], best["uncond_tread"])
    rate = f"{best['uncond_tread']:g}" if best["uncond_tread"] else "off"
    assert summary.guidance == f"cfg {best['cfg']:g}, uncond TREAD {rate} (checkpoint defaults: {defaults.source})"

    assert sample_job.main(["--checkpoint", str(checkpoint), "--prompt", "red square", "--cfg", "2", *TINY[2:],
                            "--out", str(tmp_path / "flag")]) == 0
    assert "cfg 2, uncond TREAD" in capsys.readouterr().out
    drawn = read_parameters(tmp_path / "flag" / "0000-p00-s0.png")
    assert (drawn["cfg_scale"], drawn["uncond_tread_rate"]) == (2.0, best["uncond_tread"])  # the flag wins
    (checkpoint / SAMPLING).unlink()


def test_only_a_checkpoint_gets_sampling_defaults(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="is not a checkpoint directory"):
        write_sampling_defaults(str(tmp_path), cfg=2.0, uncond_tread=0.0, source="x")
    assert not (tmp_path / SAMPLING).exists()


@pytest.mark.integration
def test_an_s3_checkpoint_gets_its_defaults_and_sampling_from_it_uses_them(setup, s3_server, tmp_path):
    s3 = S3Options(endpoint_url=s3_server["HDM_S3_ENDPOINT"])
    boto3.client("s3", endpoint_url=s3.endpoint_url).create_bucket(Bucket="hdm-sweep")
    uri = "s3://hdm-sweep/runs/train-32/final"
    upload(setup["checkpoint"], uri, s3)
    with pytest.raises(FileNotFoundError, match="s3://hdm-sweep/runs is not a checkpoint \\(no config.json\\)"):
        write_sampling_defaults("s3://hdm-sweep/runs", cfg=2.0, uncond_tread=0.0, source="x", s3=s3)

    config = EvaluateConfig(checkpoint=uri, prompt_file=str(setup["prompts"]), seeds=[0], width=32, height=32, steps=2,
                            device="cpu", out=str(tmp_path / "eval"), s3=s3, tracking={"uri": setup["uri"]},
                            sweep={"cfg": [2.0], "uncond_tread": [0.0, 0.3]})
    summary = run_evaluation(config)
    best = summary.sweep.best
    fs, path = resolve(f"{uri}/{SAMPLING}", s3)
    written = SamplingDefaults.from_text(read_bytes(fs, path).decode())
    assert (written.cfg_scale, written.uncond_tread_rate) == (2.0, best.uncond_tread)

    sampled = run_sampling(SampleConfig(checkpoint=uri, prompts=["red square"], width=32, height=32, steps=2,
                                        device="cpu", out=str(tmp_path / "samples"), s3=s3))
    drawn = read_parameters(sampled.images[0])
    assert (drawn["cfg_scale"], drawn["uncond_tread_rate"]) == (2.0, best.uncond_tread)
    assert "checkpoint defaults: evaluate sweep" in sampled.guidance
