"""The pipeline DAG's config, wiring, digests and plan (no services: jobs/run_pipeline.py --dry-run)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipelines.config import load_config
from pipelines.dag.estimate import format_plan
from pipelines.dag.spec import DagConfig, StagePlan, job_config, plan, uri_join, validate_stage

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "pipelines" / "dag" / "configs"
BASE = CONFIGS / "hdm_xut_base.toml"


def _config(stages: dict, **pipeline) -> DagConfig:
    return DagConfig.model_validate({"pipeline": {"name": "t", "storage": "/data/t", **pipeline}, "stages": stages})


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
    assert "stages.precompute.retries: unknown setting (a typo?)" in result.stderr
    assert "errors.pydantic.dev" not in result.stderr and result.stderr.count("\n") == 1

    with pytest.raises(ValidationError, match="stage 'train-64' needs 'precompute-x', which is not a stage"):
        _config({**CHAIN, "train-64": {**CHAIN["train-64"], "needs": ["precompute-x"]}})
    with pytest.raises(ValidationError, match="needs a stage of kind 'train' .*or params.checkpoint"):
        _config({**CHAIN, "eval": {"kind": "evaluate"}})
    with pytest.raises(ValidationError, match="cycle"):
        _config({"a": {"kind": "ingest", "needs": ["b"], "params": {"url_list": "/u"}},
                 "b": {"kind": "ingest", "needs": ["a"], "params": {"url_list": "/u"}}})


def test_bad_stage_params_are_refused_naming_the_stage():
    config = _config({**CHAIN, "train-64": {**CHAIN["train-64"], "params": {"res": 63, "model": "tiny"}}})
    with pytest.raises(ValueError, match=r"^stage 'train-64' \(jobs/train_stage.py\): params.res: res must be a "
                                         r"multiple of 16 px, got 63$"):
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
    config = load_config(DagConfig, str(path))
    (stage,) = plan(config, cwd=tmp_path)
    assert stage.folder.startswith(f"{tmp_path}/runs/p/i/")
    moved = load_config(DagConfig, str(path), {"pipeline.storage": "s3://bucket/p"})
    assert plan(moved)[0].folder.startswith("s3://bucket/p/i/")


def test_environment_references_are_expanded_or_refused(monkeypatch):
    monkeypatch.setenv("HDM_TEST_BUCKET", "s3://my-bucket")
    config = _config(CHAIN, storage="${HDM_TEST_BUCKET}/hdm")
    assert plan(config)[0].folder.startswith("s3://my-bucket/hdm/ingest/")
    monkeypatch.delenv("HDM_TEST_BUCKET")
    with pytest.raises(ValidationError, match="environment variable HDM_TEST_BUCKET is not set"):
        _config(CHAIN, storage="${HDM_TEST_BUCKET}/hdm")


# The stages that now `extend` another, as the TOMLs wrote them out before `extends` (every value copied):
# the resolved configs must be the same.
_BASE_TRAIN = {"model": "xut-base", "text_encoder": "Qwen/Qwen3-0.6B", "workers": 4, "use_gpu": True}
_DEMO_TRAIN = {"model": "tiny", "text_encoder": "${HDM_DEMO_TEXT_ENCODER}", "text_cache_size": 256, "warmup_steps": 30,
               "base_lr": 0.5, "batch_size": 32, "grad_accum": 1, "tread_rate": 0.0, "ctx_length": 12,
               "checkpointing": "none", "workers": 1}
WRITTEN_OUT = {
    "hdm_xut_base.toml": {
        "train-512": {"kind": "train", "needs": ["precompute", "train-256"], "params": {
            "res": 512, **_BASE_TRAIN, "steps": 82_705, "warmup_steps": 1000, "checkpoint_every": 2000,
            "sample": {"every": 5000}}, "plan": {"throughput": 24.5, "images": 8_469_000}},
        "train-768": {"kind": "train", "needs": ["precompute", "train-512"], "params": {
            "res": 768, **_BASE_TRAIN, "steps": 16_541, "warmup_steps": 500, "checkpoint_every": 1000,
            "sample": {"every": 2000}}, "plan": {"throughput": 14.0, "images": 8_469_000}},
        "train-1024": {"kind": "train", "needs": ["precompute", "train-768"], "params": {
            "res": 1024, **_BASE_TRAIN, "steps": 14_253, "warmup_steps": 500, "checkpoint_every": 1000,
            "sample": {"every": 2000}}, "plan": {"throughput": 5.17, "images": 3_649_000}},
    },
    "demo.toml": {
        "train-64": {"kind": "train", "needs": ["precompute", "train-32"], "params": {
            "res": 64, **_DEMO_TRAIN, "steps": 1600, "ema_decay": 0.995, "checkpoint_every": 800, "log_every": 100}},
        "eval-64": {"kind": "evaluate", "needs": ["train-64", "data", "eval-32"], "params": {
            "width": 64, "height": 64, "steps": 16, "cfg": 1.5, "seeds": [0, 1, 2, 3, 4, 5, 6, 7], "batch_size": 8}},
    },
}


def _job(config: DagConfig, stage: StagePlan) -> dict:
    """The stage's validated job config, with its digest (in its folder, run name, stage key) left out."""
    digest = "0" * 64
    stage = dataclasses.replace(stage, digest=digest, folder=uri_join(stage.folder.rsplit("/", 2)[0], stage.name,
                                                                      digest[:12]))
    return validate_stage(config, stage).model_dump()


@pytest.mark.parametrize("name", sorted(WRITTEN_OUT))
def test_configs_that_extend_resolve_to_the_written_out_stages(name, monkeypatch):
    monkeypatch.setenv("HDM_DEMO_TEXT_ENCODER", "/models/text-encoder")
    data = tomllib.loads((CONFIGS / name).read_text())
    assert {n for n, spec in data["stages"].items() if "extends" in spec} == set(WRITTEN_OUT[name])
    new = DagConfig.model_validate(data)
    old = DagConfig.model_validate({**data, "stages": {**data["stages"], **WRITTEN_OUT[name]}})
    assert list(new.stages) == list(old.stages)
    new_plan, old_plan = ({s.name: s for s in plan(c)} for c in (new, old))
    for stage, spec in old.stages.items():
        assert (new.stages[stage].kind, new.stages[stage].needs, new.stages[stage].plan) == \
            (spec.kind, spec.needs, spec.plan), stage
        assert new_plan[stage].wiring == old_plan[stage].wiring, stage
        assert _job(new, new_plan[stage]) == _job(old, old_plan[stage]), stage


EXTENDED = {
    **CHAIN,
    # batch_size and tread_rate set on purpose; base_lr and grad_accum at the 256 px recipe's values
    "train-256": {"kind": "train", "needs": ["precompute"], "params": {
        "res": 256, "model": "tiny", "name": "first", "steps": 7, "base_lr": 0.5, "grad_accum": 4,
        "batch_size": 16, "tread_rate": 0.0, "sample": {"every": 5, "steps": 4}}},
    "train-512": {"extends": "train-256", "needs": ["precompute", "train-256"], "params": {"res": 512}},
    "train-768": {"extends": "train-512", "needs": ["precompute", "train-512"], "params": {"res": 768, "base_lr": 0.2}},
}


def test_extends_follows_the_recipe_and_keeps_values_set_on_purpose():
    config = _config(EXTENDED)
    stages = {s.name: s for s in plan(config)}
    t512_spec = config.stages["train-512"]
    assert t512_spec.kind == "train" and t512_spec.needs == ["precompute", "train-256"]  # needs: its own
    assert stages["train-512"].params == {"res": 512, "model": "tiny", "steps": 7, "batch_size": 16, "tread_rate": 0.0,
                                          "sample": {"every": 5, "steps": 4}}  # no name: it is not inherited
    t512, t768 = (validate_stage(config, stages[s]) for s in ("train-512", "train-768"))
    assert (t512.base_lr, t512.grad_accum, t512.betas, t512.weight_decay) == (0.1, 2, (0.9, 0.995), 0.005)
    assert (t512.batch_size, t512.tread_rate, t512.steps, t512.sample.steps) == (16, 0.0, 7, 4)
    assert (t768.base_lr, t768.grad_accum, t768.batch_size, t768.weight_decay) == (0.2, 2, 16, 0.002)

    # the digest hashes the resolved params: a change in the parent reruns the stages that extend it
    changed = _config({**EXTENDED, "train-256": {**EXTENDED["train-256"], "needs": ["precompute"], "params": {
        **EXTENDED["train-256"]["params"], "batch_size": 8}}})
    after = {s.name: s for s in plan(changed)}
    assert after["train-512"].params["batch_size"] == 8
    assert all(after[s].digest != stages[s].digest for s in ("train-256", "train-512", "train-768"))


def test_extends_merges_other_kinds_and_leaves_wired_inputs_to_the_needs():
    config = _config({
        **CHAIN,
        "train-64": {**CHAIN["train-64"], "needs": [], "params": {"res": 64, "latents": "/l", "init_from": "/c"}},
        "train-128": {"extends": "train-64", "needs": ["precompute", "train-64"], "params": {"res": 128}},
        "s1": {"kind": "sample", "needs": ["train-64"], "params": {"seeds": [1, 2], "width": 32, "grid": True}},
        "s2": {"extends": "s1", "params": {"checkpoint": "/ckpt", "width": 64}},
    })
    stages = {s.name: s for s in plan(config)}
    assert stages["train-128"].params == {"res": 128}  # latents and init_from come from its needs
    assert stages["train-128"].wiring == {"latents": ("precompute", "latents"), "init_from": ("train-64", "checkpoint")}
    assert config.stages["s2"].kind == "sample" and config.stages["s2"].needs == []
    assert stages["s2"].params == {"seeds": [1, 2], "width": 64, "grid": True, "checkpoint": "/ckpt"}

    with pytest.raises(ValidationError, match="params.latents is also the output of 'precompute'"):
        _config({**EXTENDED, "train-512": {**EXTENDED["train-512"], "params": {"res": 512, "latents": "/x"}}})


@pytest.mark.parametrize("stages, message", [
    ({"train-512": {"extends": "train-25", "params": {"res": 512}}},
     "stage 'train-512' extends 'train-25', which is not a stage of this pipeline"),
    ({"train-512": {"extends": "train-768", "params": {"res": 512}},
      "train-768": {"extends": "train-512", "params": {"res": 768}}},
     "stage 'train-512': extends form a cycle: train-512 -> train-768 -> train-512"),
    ({"train-512": {"extends": "train-512"}}, "stage 'train-512': extends form a cycle: train-512 -> train-512"),
    ({"train-512": {"kind": "sample", "extends": "train-256"}},
     r"stage 'train-512' \(kind sample\) extends 'train-256' \(kind train\): a stage extends only a stage of"),
    ({"train-512": {"needs": ["train-256"]}}, "train-512\n.*kind is missing"),
])
def test_extends_errors_name_the_stage(stages, message):
    with pytest.raises(ValidationError, match=message):
        _config({**EXTENDED, **stages})
