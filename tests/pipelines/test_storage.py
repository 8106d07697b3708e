"""pipelines.storage: local paths and s3:// behind one interface; download and upload between them."""

import os
from pathlib import Path

import boto3
import pytest

from pipelines.config import S3Options
from pipelines.storage import download, local_path, upload


def test_local_paths_and_hub_ids_are_not_copied(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    assert download(str(tmp_path / "ckpt"), scratch) == str(tmp_path / "ckpt")
    assert download(f"file://{tmp_path}/ckpt", scratch) == f"{tmp_path}/ckpt"
    assert download("Qwen/Qwen3-0.6B", scratch) == "Qwen/Qwen3-0.6B"
    with local_path(str(tmp_path)) as path:
        assert path == str(tmp_path)
    assert list(scratch.iterdir()) == []


@pytest.mark.integration
def test_upload_then_download_through_s3(s3_server, tmp_path):
    s3 = S3Options(endpoint_url=s3_server["HDM_S3_ENDPOINT"])
    boto3.client("s3", endpoint_url=s3.endpoint_url).create_bucket(Bucket="hdm-storage")
    source = tmp_path / "ckpt"
    (source / "sub").mkdir(parents=True)
    (source / "model.safetensors").write_bytes(b"weights")
    (source / "config.json").write_text("{}")
    (source / "sub" / "extra.txt").write_text("extra")
    upload(source, "s3://hdm-storage/runs/ckpt", s3)

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    whole = download("s3://hdm-storage/runs/ckpt", scratch, s3)
    assert sorted(str(p.relative_to(whole)) for p in Path(whole).rglob("*") if p.is_file()) == \
        ["config.json", "model.safetensors", "sub/extra.txt"]
    some = download("s3://hdm-storage/runs/ckpt", scratch, s3, files=("config.json",),
                    optional=("model.safetensors", "ema.safetensors"))
    assert sorted(p.name for p in Path(some).iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(FileNotFoundError, match="is not a checkpoint: no training_state.pt"):
        download("s3://hdm-storage/runs/ckpt", scratch, s3, files=("training_state.pt",))
    with pytest.raises(FileNotFoundError, match="nothing at s3://hdm-storage/runs/missing"):
        download("s3://hdm-storage/runs/missing", scratch, s3)
    with local_path("s3://hdm-storage/runs/ckpt/config.json", s3) as path:
        assert open(path).read() == "{}"
        kept = path
    assert not os.path.exists(kept)  # the temporary copy is gone
