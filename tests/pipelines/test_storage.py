"""pipelines.storage: local paths and s3:// behind one interface; download and upload between them."""

import os
from pathlib import Path

import boto3
import pyarrow.fs as pafs
import pytest

from pipelines.config import S3Options
from pipelines.storage import download, list_files, local_path, node_copy, upload, write_bytes_atomic


def test_local_paths_and_hub_ids_are_not_copied(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    assert download(str(tmp_path / "ckpt"), scratch) == str(tmp_path / "ckpt")
    assert download(f"file://{tmp_path}/ckpt", scratch) == f"{tmp_path}/ckpt"
    assert download("Qwen/Qwen3-0.6B", scratch) == "Qwen/Qwen3-0.6B"
    with local_path(str(tmp_path)) as path:
        assert path == str(tmp_path)
    assert list(scratch.iterdir()) == []


def test_list_files_skips_our_bookkeeping_unless_asked(tmp_path):
    fs = pafs.LocalFileSystem()
    for name in ("a.parquet", "_attempts/x.json", "sub/_DSC1234.JPG", ".DS_Store", ".git/HEAD"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    write_bytes_atomic(fs, str(tmp_path / "sub" / "b.parquet"), b"y")  # its temporary name is gone

    def relative(paths: list[str]) -> list[str]:
        return [os.path.relpath(p, tmp_path) for p in paths]

    assert relative(list_files(fs, str(tmp_path))) == ["a.parquet", "sub/b.parquet"]
    assert relative(list_files(fs, str(tmp_path), skip=(".",))) == ["_attempts/x.json", "a.parquet",
                                                                    "sub/_DSC1234.JPG", "sub/b.parquet"]
    assert len(list_files(fs, str(tmp_path), skip=())) == 6


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
    upload(source / "sub", "s3://hdm-storage/runs/flat", s3)  # a folder of files only (no nested folder)
    flat = download("s3://hdm-storage/runs/flat", scratch, s3)
    assert [p.name for p in Path(flat).iterdir()] == ["extra.txt"]
    with local_path("s3://hdm-storage/runs/ckpt/config.json", s3) as path:
        assert open(path).read() == "{}"
        kept = path
    assert not os.path.exists(kept)  # the temporary copy is gone


@pytest.mark.integration
def test_node_copy_is_shared_on_a_node_and_follows_changes(s3_server, tmp_path, monkeypatch):
    """A model on s3:// (a VAE the precompute encoders load by path): one copy per node for every process and
    thread asking at once, downloaded again when the objects change (the old copy removed); a local path or
    hub id comes back as given, nothing at the URI is a FileNotFoundError."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    s3 = S3Options(endpoint_url=s3_server["HDM_S3_ENDPOINT"])
    boto3.client("s3", endpoint_url=s3.endpoint_url).create_bucket(Bucket="hdm-models")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"latent_channels": 4}')
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    upload(tmp_path / "vae", "s3://hdm-models/vae", s3)

    with ThreadPoolExecutor(4) as pool:  # four encoders starting at once
        paths = set(pool.map(lambda uri: node_copy(uri, s3), ["s3://hdm-models/vae", "s3://hdm-models/vae/"] * 2))
    (first,) = paths
    assert sorted(os.listdir(first)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert open(os.path.join(first, "config.json")).read() == '{"latent_channels": 4}'
    assert len(list(Path(first).parent.iterdir())) == 1  # one copy, no temporary folder left
    assert node_copy("s3://hdm-models/vae", s3) == first  # a later process finds it

    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"retrained")
    upload(tmp_path / "vae", "s3://hdm-models/vae", s3)
    second = node_copy("s3://hdm-models/vae", s3)
    assert second != first and not os.path.exists(first)
    assert Path(second, "diffusion_pytorch_model.safetensors").read_bytes() == b"retrained"
    single = node_copy("s3://hdm-models/vae/config.json", s3)  # one object
    assert single.endswith("/config.json") and open(single).read() == '{"latent_channels": 4}'

    assert node_copy("madebyollin/taesd", s3) == "madebyollin/taesd"
    assert node_copy(f"file://{tmp_path}/vae", s3) == f"{tmp_path}/vae"
    with pytest.raises(FileNotFoundError, match="nothing at s3://hdm-models/missing"):
        node_copy("s3://hdm-models/missing", s3)
