"""Credentials never reach what the pipeline writes: MLflow params and checkpoint configs."""

from __future__ import annotations

import json

from hdm_model import XUTConfig
from pipelines.train.config import TrainStageConfig
from pipelines.secrets import MASK, environment_secrets, redact, redact_text
from pipelines.tracking import StageRun
from pipelines.train.worker import checkpoint_meta

FAKE_KEY = "fake-secret-123"
DB_PASSWORD = "db-pass-456"


def test_secret_keys_uri_passwords_and_environment_secrets_are_masked():
    config = {"tracking": {"uri": f"postgresql://mlflow:{DB_PASSWORD}@db:5432/mlflow", "experiment": "hdm"},
              "s3": {"endpoint_url": "http://127.0.0.1:9000", "secret_key": "k", "profile": None},
              "api_key": 42, "note": f"signed with {FAKE_KEY}", "urls": ["https://user:tok@host/x", "s3://b/p"],
              "max_new_tokens": 40, "res": 256}
    out = redact(config, secrets={FAKE_KEY})
    assert out["tracking"] == {"uri": f"postgresql://mlflow:{MASK}@db:5432/mlflow", "experiment": "hdm"}
    assert out["s3"] == {"endpoint_url": "http://127.0.0.1:9000", "secret_key": MASK, "profile": None}
    assert out["api_key"] == MASK and out["note"] == f"signed with {MASK}"
    assert out["urls"] == [f"https://user:{MASK}@host/x", "s3://b/p"]
    assert (out["max_new_tokens"], out["res"]) == (40, 256)  # not secrets: same values, same types
    assert config["s3"]["secret_key"] == "k"  # the input is not modified


def test_environment_secrets_are_found_by_variable_name():
    env = {"AWS_SECRET_ACCESS_KEY": "a" * 40, "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "MLFLOW_TRACKING_TOKEN": "t0k",
           "POSTGRES_PASSWORD": "pw", "TOKENIZERS_PARALLELISM": "false", "AWS_DEFAULT_REGION": "us-east-1",
           "HF_TOKEN": ""}
    assert environment_secrets(env) == {"a" * 40, "AKIAEXAMPLE", "t0k", "pw"}
    # a short secret (moto's "testing") is masked as a whole value, never inside other words
    assert redact_text("testing", {"testing"}) == MASK
    assert redact_text("s3://testing-bucket", {"testing"}) == "s3://testing-bucket"
    assert redact_text("http://127.0.0.1:5000", set()) == "http://127.0.0.1:5000"


def test_logged_params_and_checkpoint_config_hold_no_credential(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_KEY)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = TrainStageConfig(res=256, latents="s3://hdm-data/latents", storage="s3://hdm-data/runs",
                         s3={"endpoint_url": f"https://user:{DB_PASSWORD}@s3.example.internal"},
                         tracking={"uri": f"https://mlflow:{DB_PASSWORD}@mlflow.example.internal",
                                   "run_name": FAKE_KEY})
    run = StageRun.open(tracking_uri=tracking, experiment="hdm", stage_key="k", run_name="train-256")
    run.log_params(config.model_dump(mode="json"))

    from mlflow import MlflowClient

    params = MlflowClient(tracking_uri=tracking).get_run(run.run_id).data.params
    assert params["res"] == "256" and params["s3.endpoint_url"] == f"https://user:{MASK}@s3.example.internal"
    assert params["tracking.uri"] == f"https://mlflow:{MASK}@mlflow.example.internal"
    assert params["tracking.run_name"] == MASK
    assert not [k for k, v in params.items() if FAKE_KEY in v or DB_PASSWORD in v]

    meta = json.dumps(checkpoint_meta(config, XUTConfig.preset("tiny"), "vae-id").to_json())  # a checkpoint's config.json
    assert FAKE_KEY not in meta and DB_PASSWORD not in meta and "s3.example.internal" in meta
