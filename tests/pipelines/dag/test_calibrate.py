"""Plans from measurements: the calibration DAG (train stages cut to a few steps, what they need unchanged), the
shape key that finds a measurement again, the plan's arithmetic with a measured figure and a price, and a real
calibration of the reduced demo on a local Ray cluster and MLflow server, then read back by --dry-run."""

from __future__ import annotations

import re
import uuid

import pytest

from pipelines.dag.calibrate import Measurement, calibration_config, shape_key
from pipelines.dag.estimate import format_plan
from pipelines.dag.spec import DagConfig, plan
from tests.pipelines.dag.test_pipeline_dag import reduced_demo, run_pipeline

STAGES = {
    "precompute": {"kind": "precompute", "params": {"input": "/data/images", "resolutions": [256], "vae": "tiny"}},
    "train-256": {"kind": "train", "needs": ["precompute"],
                  "params": {"res": 256, "model": "tiny", "steps": 1000, "batch_size": 8, "grad_accum": 1,
                             "workers": 2}},
    "samples": {"kind": "sample", "needs": ["train-256"], "params": {"prompts": ["a cat"]}},
}


def _config(stages=STAGES, **pipeline) -> DagConfig:
    return DagConfig.model_validate({"pipeline": {"name": "p", "storage": "/runs/p", "images": 4000, **pipeline},
                                     "stages": stages})


def _stage(config: DagConfig, name: str):
    return next(s for s in plan(config) if s.name == name)


def test_the_calibration_dag_keeps_what_train_stages_need_and_cuts_their_steps():
    config = _config()
    reduced = calibration_config(config, steps=8)
    assert list(reduced.stages) == ["precompute", "train-256"]  # the sample stage is not needed
    assert reduced.stages["precompute"] == config.stages["precompute"]  # unchanged: a finished one is skipped
    assert {k: reduced.stages["train-256"].params[k] for k in ("steps", "warmup_steps", "log_every")} == {
        "steps": 8, "warmup_steps": 4, "log_every": 2}
    assert reduced.pipeline.name == "p-calibrate" and reduced.pipeline.tracking.experiment == "p"
    assert _stage(reduced, "precompute").digest == _stage(config, "precompute").digest


def test_a_measurement_is_found_by_shape_not_by_schedule():
    key = shape_key(_config(), _stage(_config(), "train-256"))
    longer = {**STAGES, "train-256": {**STAGES["train-256"], "params": {**STAGES["train-256"]["params"],
                                                                          "steps": 5, "base_lr": 0.1}}}
    assert shape_key(_config(longer), _stage(_config(longer), "train-256")) == key
    wider = {**STAGES, "train-256": {**STAGES["train-256"], "params": {**STAGES["train-256"]["params"],
                                                                        "batch_size": 16}}}
    assert shape_key(_config(wider), _stage(_config(wider), "train-256")) != key


def test_measured_throughput_wins_and_the_price_gives_the_cost():
    config = _config(use_gpu=True, stages={**STAGES, "train-256": {**STAGES["train-256"], "plan": {"throughput": 1.0}}})
    assumed = format_plan(config, plan(config), price_per_gpu_hour=2.0)
    # 1000 steps x 8 x 2 workers = 16,000 samples at 1 sample/s per worker: 8,000 s = 2.22 h, 4.44 GPU-hours
    assert "about 2.22 h; 4.4 GPU-hours (assumed: 1.00 samples/s per worker); cost 8.89" in assumed
    measured = format_plan(config, plan(config), measured={"train-256": Measurement(4.0, "2026-12-05T06:00:00+00:00")},
                           price_per_gpu_hour=2.0)
    assert "about 0.56 h; 1.1 GPU-hours (measured 2026-12-05: 4.00 samples/s per worker); cost 2.22" in measured
    assert "total: about 0.6 h, 1.1 GPU-hours, cost 2.22 at 2.00 per GPU-hour" in measured


@pytest.mark.integration
@pytest.mark.slow  # about 2 min here: data, ingest, VAE and precompute of the reduced demo run first
def test_calibrate_records_throughput_that_dry_run_then_uses(ray_cluster, mlflow_server, tmp_path):
    config = reduced_demo(mlflow_server["MLFLOW_TRACKING_URI"], f"calibrate-{uuid.uuid4().hex[:6]}")
    config["stages"] = {k: v for k, v in config["stages"].items() if k in ("data", "ingest", "vae", "precompute",
                                                                            "train-32")}
    storage = tmp_path / "runs"
    result = run_pipeline(config, ray_cluster, storage, "--calibrate", "--calibrate-steps", "4",
                          "--price-per-gpu-hour", "2.5")
    assert result.returncode == 0, result.output[-6000:]
    rate = float(re.search(r"\[train-32\] measured ([\d.]+) samples/s", result.stdout).group(1))
    assert rate > 0
    assert not any((storage / "train-32").iterdir())  # the reduced stage's output was removed

    dry = run_pipeline(config, ray_cluster, storage, "--dry-run", "--price-per-gpu-hour", "2.5")
    assert dry.returncode == 0, dry.output[-3000:]
    line = next(l for l in dry.stdout.splitlines() if "samples/s per worker" in l)
    assert re.search(r"\(measured \d{4}-\d\d-\d\d: [\d.]+ samples/s per worker\); cost [\d.,]+", line), line
    assert "cost" in dry.stdout.splitlines()[-1]
