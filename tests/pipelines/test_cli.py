"""What a person sees when a job's flags or paths are wrong: one line per error naming the flag as typed (or the
field of the --config file) without pydantic's dumps; a relative path in a job submitted with --working-dir is
refused saying why, instead of being read or written inside Ray's copy of the working directory."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
from pydantic import Field, field_validator

from pipelines.cli import config_from_flags
from pipelines.config import ConfigError, StrictModel
from pipelines.storage import RAY_JOB_CONFIG, RelativePathInJob, local_abspath, resolve
from tests.pipelines.helpers import ROOT, ray_job_submit


class Inner(StrictModel):
    mode: str = "keep"


class Job(StrictModel):
    res: int
    prompts: list[str]
    steps: int = Field(10, ge=1)
    inner: Inner = Inner()

    @field_validator("res")
    @classmethod
    def _multiple(cls, value: int) -> int:
        if value % 16:
            raise ValueError(f"res must be a multiple of 16 px, got {value}")
        return value


def _parse(argv: list[str]) -> Job:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config")
    ap.add_argument("--res", type=int)
    ap.add_argument("--prompt", action="append", dest="prompts")
    ap.add_argument("--steps", type=int)
    return config_from_flags(Job, vars(ap.parse_args(argv)), parser=ap)


@pytest.mark.parametrize("argv, lines", [
    (["--res", "100", "--prompt", "a"], ["--res 100: res must be a multiple of 16 px, got 100"]),
    (["--res", "64"], ["--prompt is required"]),  # spelled as typed, not as its dest (prompts)
    (["--res", "64", "--prompt", "a", "--steps", "0"], ["--steps 0: Input should be greater than or equal to 1"]),
])
def test_flag_errors_are_one_line_each_naming_the_flag(argv, lines):
    with pytest.raises(ConfigError) as e:
        _parse(argv)
    assert e.value.lines == lines


def test_errors_from_the_config_file_name_its_fields(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('steps = 0\nprompts = ["a"]\n[inner]\nmod = "x"\n')
    with pytest.raises(ConfigError) as e:
        _parse(["--config", str(path), "--res", "100"])
    assert e.value.lines == [
        "--res 100: res must be a multiple of 16 px, got 100",
        f"steps in --config {path}: Input should be greater than or equal to 1",
        f"inner.mod in --config {path}: unknown setting (a typo?)",
    ]
    path.write_text("steps = 2\n")
    with pytest.raises(ConfigError) as e:
        _parse(["--config", str(path), "--res", "64"])
    assert e.value.lines == [f"--prompt is required (or prompts in --config {path})"]


def test_train_stage_with_a_bad_res_and_no_storage_prints_one_line_per_flag():
    result = subprocess.run([sys.executable, "jobs/train_stage.py", "--res", "100"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["train_stage: --res 100: res must be a multiple of 16 px, got 100",
                                          "train_stage: --latents is required", "train_stage: --storage is required"]
    assert "pydantic" not in result.stderr and not result.stdout


def test_relative_paths_are_refused_only_inside_an_uploaded_working_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shipped").mkdir()
    assert local_abspath("runs/x") == str(tmp_path / "runs" / "x")  # outside a Ray job: where it was typed
    monkeypatch.setenv(RAY_JOB_CONFIG, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}}))
    with pytest.raises(RelativePathInJob, match=r'runs/x: a relative path in a Ray job .* "\$PWD/runs/x"'):
        resolve("runs/x")
    assert resolve("shipped")[1] == str(tmp_path / "shipped")  # it exists in the copy: shipped with the code
    assert resolve("/abs/y")[1] == "/abs/y"
    monkeypatch.setenv(RAY_JOB_CONFIG, json.dumps({"runtime_env": {}}))  # a job without --working-dir
    assert resolve("runs/x")[1] == str(tmp_path / "runs" / "x")


@pytest.mark.integration
def test_a_job_submitted_with_a_relative_path_is_refused_saying_why(ray_cluster, tmp_path):
    """The user's case: `ray job submit --working-dir . -- python jobs/precompute_latents.py --input runs/...`
    for a folder that exists where they typed it but not in Ray's copy (runs/ is not uploaded)."""
    (ROOT / "runs").mkdir(exist_ok=True)
    typed = f"runs/{tmp_path.name}-images"
    (ROOT / typed).mkdir()
    try:
        result = ray_job_submit(ray_cluster, ["jobs/precompute_latents.py", "--input", typed, "--output",
                                              str(tmp_path / "out"), "--res", "32"], timeout=300)
    finally:
        (ROOT / typed).rmdir()
    assert result.returncode != 0
    assert (f"precompute: {typed}: a relative path in a Ray job resolves inside Ray's copy of the working "
            "directory") in result.output and f'"$PWD/{typed}"' in result.output, result.output[-3000:]
    assert not (tmp_path / "out").exists()  # refused before anything was written
