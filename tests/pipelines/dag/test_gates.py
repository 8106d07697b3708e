"""Quality gates and the parent run's stage comparison: the gate's verdict and message (thresholds, no worse than
an upstream stage in both directions, the tolerance's edge, a metric not logged), its config errors, the demo's
gate on recorded runs, the comparison's table and plot; and one real pipeline (Ray jobs, MLflow server) whose
VAE stage fails an impossible gate, so its dependent does not run."""

from __future__ import annotations

import csv
import io
import re
import tomllib

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from pipelines.dag.compare import metric_names, plot, resolution, rows, to_csv, to_html
from pipelines.dag.gates import GateSpec, check
from pipelines.dag.runner import StageResult, _own_metrics, format_results
from pipelines.dag.spec import DagConfig, plan
from pipelines.eval.metrics import ADHERENCE_COLOR, ADHERENCE_SHAPE, CLIP_SCORE, EVAL_METRICS, FID
from tests.pipelines.dag.test_pipeline_dag import DEMO, reduced_demo, run_pipeline


def _gate(**fields) -> GateSpec:
    return GateSpec.model_validate(fields)


# --- the verdict -----------------------------------------------------------------------------------------------

def test_threshold_passes_and_fails_naming_metric_value_and_bound():
    gate = _gate(metric="after/psnr", min=18.0)
    assert check(gate, metrics={"after/psnr": 21.5}).tag == "passed: after/psnr 21.5 >= min 18"
    failed = check(gate, metrics={"after/psnr": 9.25})
    assert not failed.passed and failed.text == "after/psnr 9.25 < min 18"
    both = _gate(metric=FID, min=1.0, max=50.0)
    assert check(both, metrics={FID: 80.0}).text == "fid 80 > max 50"
    assert check(both, metrics={FID: 20.0}).text == "fid 20 >= min 1; fid 20 <= max 50"


def test_no_worse_than_higher_is_better():
    gate = _gate(metric=ADHERENCE_COLOR, no_worse_than="eval-32", tolerance=0.05)
    failed = check(gate, metrics={ADHERENCE_COLOR: 0.41}, reference={ADHERENCE_COLOR: 0.87})
    assert not failed.passed
    assert failed.text == "adherence_color 0.41 < 0.82 (eval-32's 0.87 - tolerance 0.05)"
    assert failed.tag == "failed: " + failed.text
    assert check(gate, metrics={ADHERENCE_COLOR: 0.95}, reference={ADHERENCE_COLOR: 0.87}).passed
    assert check(gate, metrics={ADHERENCE_COLOR: 0.83}, reference={ADHERENCE_COLOR: 0.87}).passed  # within tolerance


def test_no_worse_than_lower_is_better_for_fid():
    gate = _gate(metric=FID, no_worse_than="eval-32", tolerance=5.0)
    failed = check(gate, metrics={FID: 41.0}, reference={FID: 30.0})
    assert not failed.passed and failed.text == "fid 41 > 35 (eval-32's 30 + tolerance 5)"
    passed = check(gate, metrics={FID: 12.0}, reference={FID: 30.0})  # a lower FID is better, not worse
    assert passed.passed and passed.text == "fid 12 <= 35 (eval-32's 30 + tolerance 5)"
    assert check(gate, metrics={FID: 34.0}, reference={FID: 30.0}).passed


def test_tolerance_edge_passes_exactly_and_fails_just_beyond():
    # 0.87 - 0.05 is 0.8200000000000001 in binary: a value equal to the bound in decimal is no failure
    gate = _gate(metric=ADHERENCE_COLOR, no_worse_than="eval-32", tolerance=0.05)
    assert check(gate, metrics={ADHERENCE_COLOR: 0.82}, reference={ADHERENCE_COLOR: 0.87}).passed
    assert not check(gate, metrics={ADHERENCE_COLOR: 0.8199}, reference={ADHERENCE_COLOR: 0.87}).passed
    fid = _gate(metric=FID, no_worse_than="eval-32", tolerance=0.1)
    assert check(fid, metrics={FID: 30.4}, reference={FID: 30.3}).passed  # 30.3 + 0.1 = 30.400000000000002
    assert not check(fid, metrics={FID: 30.41}, reference={FID: 30.3}).passed
    strict = _gate(metric=CLIP_SCORE, no_worse_than="eval-32")  # tolerance 0: equal passes, any drop fails
    assert check(strict, metrics={CLIP_SCORE: 25.0}, reference={CLIP_SCORE: 25.0}).passed
    assert not check(strict, metrics={CLIP_SCORE: 24.99}, reference={CLIP_SCORE: 25.0}).passed


def test_a_missing_or_nan_metric_fails_the_gate_saying_so():
    gate = _gate(metric="after/psnr", min=1.0)
    missing = check(gate, metrics={"after/eq_error": 0.1, "before/psnr": 9.0})
    assert not missing.passed
    assert missing.text == "after/psnr was not logged by the stage's run (it logged: after/eq_error, before/psnr)"
    assert check(gate, metrics={}).text == "after/psnr was not logged by the stage's run (it logged: none)"
    assert check(gate, metrics={"after/psnr": float("nan")}).text == "after/psnr is nan"
    ref = _gate(metric=ADHERENCE_SHAPE, no_worse_than="eval-32", tolerance=0.1)
    no_ref = check(ref, metrics={ADHERENCE_SHAPE: 0.9}, reference={ADHERENCE_COLOR: 0.9})
    assert not no_ref.passed and no_ref.text == "eval-32 logged no adherence_shape to compare with"


# --- config errors ---------------------------------------------------------------------------------------------

def _stages(gate: dict | None = None, eval64_needs=("train-64", "eval-32")) -> dict:
    stages = {
        "train-32": {"kind": "train", "params": {"res": 32, "model": "tiny"}},
        "eval-32": {"kind": "evaluate", "needs": ["train-32"], "params": {"width": 32, "height": 32}},
        "train-64": {"extends": "train-32", "needs": ["train-32"], "params": {"res": 64}},
        "eval-64": {"extends": "eval-32", "needs": list(eval64_needs), "params": {"width": 64, "height": 64}},
    }
    if gate is not None:
        stages["eval-64"]["gate"] = gate
    return stages


def _config(stages: dict) -> DagConfig:
    return DagConfig.model_validate({"pipeline": {"name": "t", "storage": "/data/t"}, "stages": stages})


def test_a_valid_gate_is_not_inherited_and_not_part_of_the_digest():
    gated = _config(_stages({"metric": "fid", "no_worse_than": "eval-32", "tolerance": 2.0}))
    assert gated.stages["eval-64"].gate == GateSpec(metric=FID, no_worse_than="eval-32", tolerance=2.0)
    assert gated.stages["eval-32"].gate is None
    child = _stages()
    child["eval-32"]["gate"] = {"metric": "adherence_color", "min": 0.5}
    assert _config(child).stages["eval-64"].gate is None  # eval-64 extends eval-32: its gate stays eval-32's
    plain = _config(_stages())
    assert [s.digest for s in plan(gated)] == [s.digest for s in plan(plain)]  # needs eval-32 is not wired


@pytest.mark.parametrize("gate, needs, error", [
    ({"metric": "adherence_color", "no_worse_than": "eval-16"}, ("train-64", "eval-32"),
     "stage 'eval-64': gate.no_worse_than 'eval-16' is not a stage of this pipeline"),
    ({"metric": "adherence_color", "no_worse_than": "eval-32"}, ("train-64",),
     "stage 'eval-64': gate.no_worse_than 'eval-32' is not upstream of it; add 'eval-32' to its needs"),
    ({"metric": "adherence_color", "no_worse_than": "eval-64"}, ("train-64",),
     "stage 'eval-64': gate.no_worse_than 'eval-64' is not upstream of it"),
    ({"metric": "adherence_color"}, ("train-64",), "gate on adherence_color: no bound; give min and/or max"),
    ({"metric": "fid", "min": 50, "max": 10}, ("train-64",), "min 50.0 > max 10.0: no value can pass"),
    ({"metric": "fid", "max": 10, "tolerance": 1}, ("train-64",), "tolerance applies to no_worse_than only"),
    ({"metric": "loss", "no_worse_than": "eval-32"}, ("train-64", "eval-32"),
     "no_worse_than compares evaluation metrics, whose direction is known"),
    ({"metric": "fid", "no_worse_than": "eval-32", "tolerance": -1}, ("train-64", "eval-32"),
     "greater than or equal to 0"),
    ({"metric": "fid", "max": 10, "threshold": 3}, ("train-64",), "Extra inputs are not permitted"),
])
def test_gate_config_errors_name_the_stage_and_the_fix(gate, needs, error):
    with pytest.raises(ValidationError) as e:
        _config(_stages(gate, needs))
    assert error in str(e.value)
    assert "eval-64" in str(e.value)  # in the message or in pydantic's location (stages.eval-64.gate)


def test_a_gate_on_a_stage_that_logs_no_metrics_is_refused():
    stages = {"ingest": {"kind": "ingest", "params": {"url_list": "/u.parquet"},
                         "gate": {"metric": "loss", "max": 1.0}}}
    with pytest.raises(ValidationError, match="stage 'ingest': a gate needs a stage whose run logs metrics"):
        _config(stages)


def test_demo_gate_passes_the_recorded_healthy_runs_and_stops_a_collapse(monkeypatch):
    monkeypatch.setenv("HDM_DEMO_TEXT_ENCODER", "sentence-transformers/all-MiniLM-L6-v2")
    config = DagConfig.model_validate(tomllib.loads(DEMO.read_text()))
    gate = config.stages["eval-64"].gate
    assert (gate.metric, gate.no_worse_than) == (ADHERENCE_COLOR, "eval-32")
    # colour adherence eval-32 -> eval-64 of the demo runs in benchmarks/RESULTS.md
    for before, after in [(0.92, 0.83), (0.90, 1.00), (0.88, 0.83), (0.71, 1.00), (0.83, 0.98)]:
        assert check(gate, metrics={ADHERENCE_COLOR: after}, reference={ADHERENCE_COLOR: before}).passed
    assert not check(gate, metrics={ADHERENCE_COLOR: 0.5}, reference={ADHERENCE_COLOR: 0.92}).passed


# --- the runner's report and the comparison --------------------------------------------------------------------

def test_own_metrics_keep_every_evaluation_metric_and_the_loss():
    logged = {**{m: 0.5 for m in EVAL_METRICS}, "loss": 0.3, "psnr": 20.0, "lr": 1e-3, "sweep/fid": 3.0}
    assert set(_own_metrics(logged)) == {*EVAL_METRICS, "loss", "psnr"}


def test_format_results_shows_the_failed_gate_and_the_blocked_dependent():
    message = "gate of eval-64 failed: adherence_color 0.41 < 0.82 (eval-32's 0.87 - tolerance 0.05)"
    text = format_results([StageResult("eval-64", "gate_failed", {"report": "/r"}, {ADHERENCE_COLOR: 0.41},
                                       message=message),
                           StageResult("sample-64", "blocked", message=f"not run: {message}")])
    assert f"eval-64              gate_failed /r  adherence_color=0.410  {message}" in text
    assert f"sample-64            blocked       not run: {message}" in text


def _comparison_table():
    config = _config(_stages({"metric": "adherence_color", "no_worse_than": "eval-32", "tolerance": 0.1}))
    results = {"train-32": StageResult("train-32", "done", metrics={"loss": 0.33}),
               "eval-32": StageResult("eval-32", "skipped", metrics={ADHERENCE_COLOR: 0.92, FID: 40.0}),
               "train-64": StageResult("train-64", "done", metrics={"loss": 0.17}),
               "eval-64": StageResult("eval-64", "gate_failed", metrics={ADHERENCE_COLOR: 0.5, FID: 35.5})}
    return rows(plan(config), results)


def test_comparison_table_and_plot(tmp_path):
    table = _comparison_table()
    names = metric_names(table)
    assert names == [ADHERENCE_COLOR, FID, "loss"]  # evaluation metrics first, in metrics.EVAL_METRICS' order
    parsed = list(csv.DictReader(io.StringIO(to_csv(table, names))))
    assert [(r["stage"], r["resolution"], r["status"]) for r in parsed] == [
        ("train-32", "32 px", "done"), ("eval-32", "32 px", "skipped"), ("train-64", "64 px", "done"),
        ("eval-64", "64 px", "gate_failed")]
    assert float(parsed[3][FID]) == 35.5 and parsed[3]["loss"] == "" and float(parsed[0]["loss"]) == 0.33
    page = to_html(table, names, title="pipeline t")
    assert "<th>fid (lower is better)</th>" in page and "<td>gate_failed</td><td>0.5</td><td>35.5</td>" in page
    plot(table, names, tmp_path / "metrics.png", title="pipeline t")
    with Image.open(tmp_path / "metrics.png") as png:
        assert png.format == "PNG" and png.height > png.width / 2  # three subplots stacked
    assert resolution("evaluate", {"width": 64, "height": 32}) == "64x32 px"
    assert resolution("vae", {"image_size": 64}) == ""


# --- one real pipeline ---------------------------------------------------------------------------------------

@pytest.mark.integration
def test_a_failed_gate_stops_the_dependent_tags_the_run_and_the_parent_gets_the_comparison(
        ray_cluster, mlflow_server, tmp_path):
    """The demo's vae (on a folder of 48 images; gate: held-out PSNR >= 1000 dB, impossible) -> precompute,
    which must not run."""
    from mlflow import MlflowClient

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
    uri = mlflow_server["MLFLOW_TRACKING_URI"]
    config = reduced_demo(uri, "gates")
    config["pipeline"]["name"] = "gates"
    stages = config["stages"] = {k: config["stages"][k] for k in ("vae", "precompute")}
    stages["vae"].update(needs=[], gate={"metric": "after/psnr", "min": 1000})
    stages["vae"]["params"]["input"] = stages["precompute"]["params"]["input"] = str(images)
    stages["precompute"]["needs"] = ["vae"]
    storage = tmp_path / "runs"
    first = run_pipeline(config, ray_cluster, storage)
    assert first.returncode == 1, first.output[-6000:]
    failed = re.search(r"\[vae\] gate of vae failed: after/psnr ([0-9.]+) < min 1000\n", first.stdout)
    assert failed, first.output[-6000:]
    message = failed.group(0)[len("[vae] "):-1]
    assert f"[precompute] not run: it needs vae; {message}" in first.stdout
    assert re.search(rf"vae +gate_failed .*{re.escape(message)}", first.stdout)
    assert "[precompute] submitted" not in first.stdout

    client = MlflowClient(uri)
    runs = {r.data.tags.get("hdm.dag.stage", "pipeline"): r
            for r in client.search_runs([client.get_experiment_by_name("gates").experiment_id])}
    assert set(runs) == {"pipeline", "vae"}  # precompute never opened a run
    vae, parent = runs["vae"], runs["pipeline"]
    psnr = vae.data.metrics["after/psnr"]
    assert float(failed.group(1)) == pytest.approx(psnr, rel=1e-5)
    assert vae.info.status == "FINISHED"  # the stage finished: a rerun skips it and checks its gate again
    assert vae.data.tags["hdm.gate"] == "failed: " + message[len("gate of vae failed: "):]
    assert parent.info.status == "FAILED" and parent.data.metrics["vae.after/psnr"] == psnr

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert artifacts == {"comparison/stages.csv", "comparison/stages.html", "comparison/metrics.png"}
    local = client.download_artifacts(parent.info.run_id, "comparison", str(tmp_path / "dl"))
    table = list(csv.DictReader(open(f"{local}/stages.csv")))
    assert [(r["stage"], r["status"], r["after/psnr"]) for r in table] == [("vae", "gate_failed", repr(psnr))]
    with Image.open(f"{local}/metrics.png") as png:
        png.verify()

    second = run_pipeline(config, ray_cluster, storage)  # the VAE is skipped; its recorded PSNR fails again
    assert second.returncode == 1, second.output[-4000:]
    assert "[vae] skipped" in second.stdout and f"[vae] {message}" in second.stdout
    assert "submitted" not in second.stdout
