"""The pipeline DAG's config, wiring, digests and plan (no services: jobs/run_pipeline.py --dry-run)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipelines.config import load_config
from pipelines.dag.spec import PipelineConfig, format_plan, job_config, plan

ROOT = Path(__file__).resolve().parents[3]
BASE = ROOT / "pipelines" / "dag" / "configs" / "hdm_xut_base.toml"


def _config(stages: dict, **pipeline) -> PipelineConfig:
    return PipelineConfig.model_validate({"pipeline": {"name": "t", "storage": "/data/t", **pipeline}, "stages": stages})


CHAIN = {
    "ingest": {"kind": "ingest", "params": {"url_list": "/data/urls.parquet"}},
    "precompute": {"kind": "precompute", "needs": ["ingest"], "params": {"resolutions": [64, 128], "vae": "tiny"}},
    "train-64": {"kind": "train", "needs": ["precompute"], "params": {"res": 64, "model": "tiny", "steps": 10}},
    "train-128": {"kind": "train", "needs": ["precompute", "train-64"], "params": {"res": 128, "model": "tiny"}},
}


def test_dry_run_of_the_paper_recipe_plans_its_published_cost():
    result = subprocess.run([sys.executable, "jobs/run_pipeline.py", str(BASE), "--dry-run"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for stage, steps in (("train-256", "74,460"), ("train-512", "82,705"), ("train-768", "16,541"),
                         ("train-1024", "14,253")):
        assert re.search(rf"{stage} \[train.*\n.*\n\s+{steps} steps", out), stage
    assert "152,494,080 samples (4 x 128 x 4 accum); 20.00 epochs" in out  # HDM: 152.5 M samples, 20 epochs
    hours, gpu_hours = map(float, re.search(r"total: about ([\d.]+) h, ([\d.]+) GPU-hours", out).groups())
    assert gpu_hours == pytest.approx(1540, rel=0.01)  # the report: 385 h on 4 GPUs for the four stages
    assert "latents 256 px 116.3 GiB" in out  # 7.624 M x 32 x 32 x 4 x fp16, mean + std


def test_unknown_key_and_missing_dependency_are_named(tmp_path):
    bad_key = tmp_path / "bad_key.toml"
    bad_key.write_text(BASE.read_text().replace('kind = "precompute"', 'kind = "precompute"\nretries = 3', 1))
    result = subprocess.run([sys.executable, "jobs/run_pipeline.py", str(bad_key), "--dry-run"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "stages.precompute.retries" in result.stderr
    assert "Extra inputs are not permitted" in result.stderr

    with pytest.raises(ValidationError, match="stage 'train-64' needs 'precompute-x', which is not a stage"):
        _config({**CHAIN, "train-64": {**CHAIN["train-64"], "needs": ["precompute-x"]}})
    with pytest.raises(ValidationError, match="needs a stage of kind 'train' .*or params.checkpoint"):
        _config({**CHAIN, "eval": {"kind": "evaluate"}})
    with pytest.raises(ValidationError, match="cycle"):
        _config({"a": {"kind": "ingest", "needs": ["b"], "params": {"url_list": "/u"}},
                 "b": {"kind": "ingest", "needs": ["a"], "params": {"url_list": "/u"}}})


def test_bad_stage_params_are_refused_naming_the_stage():
    config = _config({**CHAIN, "train-64": {**CHAIN["train-64"], "params": {"res": 63, "model": "tiny"}}})
    with pytest.raises(ValueError, match=r"stage 'train-64' \(kind train, jobs/train_stage.py\).*\n.*\nres\n"):
        format_plan(config, plan(config))


def test_an_input_given_twice_or_ambiguous_is_refused():
    with pytest.raises(ValidationError, match="params.latents is also the output of 'precompute'"):
        _config({**CHAIN, "train-64": {**CHAIN["train-64"], "params": {"res": 64, "latents": "/x"}}})
    with pytest.raises(ValidationError, match="could come from any of"):
        _config({**CHAIN, "p2": CHAIN["precompute"],
                 "train-64": {**CHAIN["train-64"], "needs": ["precompute", "p2"]}})


def test_wiring_passes_outputs_downstream_and_digests_follow_changes():
    config = _config(CHAIN)
    stages = {s.name: s for s in plan(config)}
    assert [s.name for s in plan(config)] == ["ingest", "precompute", "train-64", "train-128"]
    outputs = {"ingest": stages["ingest"].outputs(), "precompute": stages["precompute"].outputs(),
               "train-64": {"checkpoint": "/data/t/train-64/x/checkpoint_000003"}}
    pre = job_config(config, stages["precompute"], outputs, tracking_uri=None, parent_run_id=None)
    assert pre["input"] == stages["ingest"].folder == f"/data/t/ingest/{stages['ingest'].digest[:12]}"
    assert pre["output"] == stages["precompute"].folder
    t128 = job_config(config, stages["train-128"], outputs, tracking_uri="sqlite:///m.db", parent_run_id="p1")
    assert t128["latents"] == stages["precompute"].folder
    assert t128["init_from"] == "/data/t/train-64/x/checkpoint_000003"
    assert f"{t128['storage']}/{t128['name']}" == stages["train-128"].folder  # Ray Train's run dir
    assert t128["tracking"] == {"uri": "sqlite:///m.db", "experiment": "t", "parent_run_id": "p1",
                                "stage_key": stages["train-128"].stage_key, "run_name": "train-128"}
    t64 = job_config(config, stages["train-64"], outputs, tracking_uri=None, parent_run_id=None)
    assert t64["init_from"] == "none"  # a first stage starts fresh unless params say otherwise

    changed = _config({**CHAIN, "train-64": {**CHAIN["train-64"], "params": {"res": 64, "model": "tiny", "steps": 11}}})
    after = {s.name: s.digest for s in plan(changed)}
    assert after["ingest"] == stages["ingest"].digest and after["precompute"] == stages["precompute"].digest
    assert after["train-64"] != stages["train-64"].digest
    assert after["train-128"] != stages["train-128"].digest  # downstream of the change
    assert config.descendants("train-64") == {"train-64", "train-128"}


def test_storage_override_and_relative_storage(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[pipeline]\nname = "p"\nstorage = "runs/p"\n[stages.i]\nkind = "ingest"\n'
                    'params = { url_list = "/u.parquet" }\n')
    config = load_config(PipelineConfig, str(path))
    (stage,) = plan(config, cwd=tmp_path)
    assert stage.folder.startswith(f"{tmp_path}/runs/p/i/")
    moved = load_config(PipelineConfig, str(path), {"pipeline.storage": "s3://bucket/p"})
    assert plan(moved)[0].folder.startswith("s3://bucket/p/i/")


def test_environment_references_are_expanded_or_refused(monkeypatch):
    monkeypatch.setenv("HDM_TEST_BUCKET", "s3://my-bucket")
    config = _config(CHAIN, storage="${HDM_TEST_BUCKET}/hdm")
    assert plan(config)[0].folder.startswith("s3://my-bucket/hdm/ingest/")
    monkeypatch.delenv("HDM_TEST_BUCKET")
    with pytest.raises(ValidationError, match="environment variable HDM_TEST_BUCKET is not set"):
        _config(CHAIN, storage="${HDM_TEST_BUCKET}/hdm")
