"""pipelines.prechecks and job_main's precheck: tried as a new user would, a job with a wrong input, output
or model says so in one line and exits 2 within seconds, before Ray starts or a model loads. And the
driver's output redaction (job_main), in a real subprocess."""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from pipelines.cli import RedactingWriter
from pipelines.config import S3Options
from pipelines.prechecks import PrecheckFailed, check_input, check_model, check_output

REPO = Path(__file__).resolve().parents[2]
JOB = str(REPO / "jobs" / "precompute_latents.py")


def run_job(args: list[str], tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """The job as a user starts it, with no cluster to join: a job that got to ray.init() would start a
    local Ray under tmp_path/ray."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    environ.update(RAY_TMPDIR=str(tmp_path / "ray"), HF_HOME=str(tmp_path / "hf-home"), **env)
    start = time.monotonic()
    result = subprocess.run([sys.executable, JOB, *args], capture_output=True, text=True, env=environ, timeout=120)
    return result, time.monotonic() - start


def assert_refused_early(result: subprocess.CompletedProcess, seconds: float, tmp_path: Path, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and result.stderr.count("\n") == 1 and result.stderr.startswith("precompute: ")
    assert "Traceback" not in result.stderr and "ray" not in result.stderr.lower()
    assert not (tmp_path / "ray").exists()  # no Ray session was started
    assert seconds < 10  # (about 1 s: imports, no retries)
    for word in words:
        assert word in result.stderr


def test_missing_input_is_one_line_before_ray(tmp_path):
    result, seconds = run_job(["--input", "/nonexistent", "--output", str(tmp_path / "out")], tmp_path)
    assert_refused_early(result, seconds, tmp_path, "input /nonexistent does not exist", "pass --input")


@pytest.mark.parametrize("uri, words", [("s3://", "names no bucket"), ("s3:///x", "names no bucket"),
                                        ("s3://Photos_2024/x", "not a valid S3 bucket name")])
def test_malformed_s3_uri_is_one_line(tmp_path, uri, words):
    result, seconds = run_job(["--input", uri, "--output", str(tmp_path / "out")], tmp_path)
    assert_refused_early(result, seconds, tmp_path, words, "s3://BUCKET/PREFIX")


def test_hub_vae_offline_and_not_cached_names_the_model_and_the_way_out(tmp_path):
    (tmp_path / "images").mkdir()
    result, seconds = run_job(["--input", str(tmp_path / "images"), "--output", str(tmp_path / "out"),
                               "--vae", "KBlueLeaf/EQ-SDXL-VAE"], tmp_path, HF_HUB_OFFLINE="1")
    assert_refused_early(result, seconds, tmp_path, "--vae KBlueLeaf/EQ-SDXL-VAE", "pass --vae /path/to",
                         "unset HF_HUB_OFFLINE")


def test_unreachable_hub_is_asked_once(tmp_path):
    (tmp_path / "images").mkdir()
    result, seconds = run_job(["--input", str(tmp_path / "images"), "--output", str(tmp_path / "out"),
                               "--caption-mode", "model", "--caption-model", "someone/captioner",
                               "--vae", str(tiny_model_folder(tmp_path))], tmp_path,
                              HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens on 9
    assert_refused_early(result, seconds, tmp_path, "--caption-model someone/captioner", "did not answer")


def tiny_model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    return folder


def test_check_model_local_paths(tmp_path):
    check_model(str(tiny_model_folder(tmp_path)), what="--vae")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrecheckFailed, match="without config.json, not a saved model; pass --vae"):
        check_model(str(tmp_path / "empty"), what="--vae")
    with pytest.raises(PrecheckFailed, match="is a file"):
        check_model(str(tmp_path / "model" / "config.json"), what="--vae")
    with pytest.raises(PrecheckFailed, match="does not exist"):
        check_model(str(tmp_path / "nope"), what="--vae")
    with pytest.raises(PrecheckFailed, match="does not exist"):
        check_model("./my/vae/folder", what="--vae")


def test_check_output_local(tmp_path):
    check_output(str(tmp_path / "new" / "deeper"), S3Options())
    (tmp_path / "file").write_text("x")
    with pytest.raises(PrecheckFailed, match="is a file; pass --output a folder"):
        check_output(str(tmp_path / "file"), S3Options())
    with pytest.raises(PrecheckFailed, match="file is a file; pass --output a path under a folder"):
        check_output(str(tmp_path / "file" / "sub"), S3Options())


def test_unreachable_s3_endpoint_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-key")
    start = time.monotonic()
    with pytest.raises(PrecheckFailed, match="http://127.0.0.1:9 did not answer"):
        check_input("s3://bucket/images", S3Options(endpoint_url="http://127.0.0.1:9"))
    assert time.monotonic() - start < 15


@pytest.mark.integration
def test_s3_buckets_and_prefixes(s3_server):
    s3 = S3Options(endpoint_url=s3_server["HDM_S3_ENDPOINT"])
    client = boto3.client("s3", endpoint_url=s3.endpoint_url)
    client.create_bucket(Bucket="hdm-precheck")
    client.put_object(Bucket="hdm-precheck", Key="images/a.jpg", Body=b"x")
    check_input("s3://hdm-precheck/images", s3)
    check_input("s3://hdm-precheck", s3)
    check_output("s3://hdm-precheck/latents/run1", s3)
    with pytest.raises(PrecheckFailed, match="nothing under 'imgs' in bucket 'hdm-precheck'"):
        check_input("s3://hdm-precheck/imgs", s3)
    for check in (check_input, check_output):
        with pytest.raises(PrecheckFailed, match="bucket 'hdm-missing' does not exist"):
            check("s3://hdm-missing/x", s3)


SECRET = "sk-test-0123456789abcdef"
LEAKY_JOB = f"""
import sys
from pydantic import BaseModel
from pipelines.cli import job_main

class Config(BaseModel):
    pass

class Summary:
    def format(self):
        return "done with {SECRET}"

def run(config):
    print("connecting with", "{SECRET}")
    sys.stdout.write("half a line {SECRET[:10]}")
    sys.stdout.write("{SECRET[10:]} and the rest\\n")
    print("progress {SECRET}", end="", file=sys.stderr, flush=True)
    if len(sys.argv) > 1:
        raise RuntimeError("refused, token {SECRET}")
    return Summary()

sys.exit(job_main("leaky", Config, run, refusals=(RuntimeError,), init_ray=False))
"""


@pytest.mark.parametrize("refuse", [False, True])
def test_job_output_is_redacted(tmp_path, refuse):
    environ = {**os.environ, "HDM_API_TOKEN": SECRET, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", LEAKY_JOB, *(["refuse"] if refuse else [])], capture_output=True,
                            text=True, env=environ, timeout=60, cwd=REPO)
    assert result.returncode == (3 if refuse else 0), result.stderr
    output = result.stdout + result.stderr
    assert SECRET not in output and SECRET[:10] not in output
    assert "connecting with ***" in result.stdout and "half a line *** and the rest" in result.stdout
    assert "progress ***" in result.stderr
    assert ("leaky refused: refused, token ***" in result.stderr) if refuse else ("done with ***" in result.stdout)


def test_redacting_writer_holds_a_line_until_complete():
    out = io.StringIO()
    writer = RedactingWriter(out, {"secret-value-1"})
    writer.write("a secret-")
    assert out.getvalue() == ""
    writer.write("value-1 b\nc secret-value-1")
    assert out.getvalue() == "a *** b\n"
    writer.flush()
    assert out.getvalue() == "a *** b\nc ***"
    assert writer.getvalue() == out.getvalue()  # the rest is the wrapped stream's
