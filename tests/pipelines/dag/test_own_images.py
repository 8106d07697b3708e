"""docs/own-images.md's two DAGs on a folder of a user's images: fine-tuning the release
(pipelines/dag/configs/own_images_finetune.toml) and training from scratch (own_images_scratch.toml).

The integration test runs both, structure unchanged, against real local services with only the model-size
fields swapped for tiny ones; the fine-tune starts from a tiny release file written the way the original's
converter writes hdm-xut-340M.safetensors."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.image_cases import smooth_images

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "pipelines" / "dag" / "configs"
FINETUNE, SCRATCH = CONFIGS / "own_images_finetune.toml", CONFIGS / "own_images_scratch.toml"
TINY_RES = {256: 32, 512: 64, 1024: 64}  # each config resolution -> the tiny run's


def own_folder(directory: Path, n: int = 24) -> Path:
    """A user's folder: NAME.jpg and NAME.png images of 64-96 px, every other one with a NAME.txt caption."""
    for i, path in enumerate(smooth_images(directory, n, sizes=(64, 80, 96))):
        if i % 2:
            Image.open(path).convert("RGB").save(path.with_suffix(".jpg"), quality=90)
            path.unlink()
            path = path.with_suffix(".jpg")
        if i % 4 < 2:
            path.with_suffix(".txt").write_text(f"a soft colour blob, picture {i}")
    return directory


def tiny(config: dict, *, text_encoder: Path, vae: Path, tracking_uri: str) -> dict:
    """The config with its model-size fields swapped for tiny ones; stages, needs and inputs untouched."""
    config = json.loads(json.dumps(config))
    config["pipeline"].update(use_gpu=False, tracking={"uri": tracking_uri, "experiment": config["pipeline"]["name"]})
    for spec in config["stages"].values():
        params = spec["params"]
        if spec["kind"] == "precompute":
            params.update(vae=str(vae), resolutions=[TINY_RES[r] for r in params["resolutions"]], batch_size=8,
                          encoders=1)
        elif spec["kind"] == "train":
            params.update(res=TINY_RES[params["res"]], model="tiny", text_encoder=str(text_encoder), steps=3,
                          warmup_steps=1, batch_size=4, grad_accum=1, ctx_length=8, workers=1, use_gpu=False,
                          checkpoint_every=2, log_every=1,
                          sample={**params.get("sample", {}), "seeds": [0], "steps": 2, "every": 1000})
        elif spec["kind"] == "sample":
            params.update(width=TINY_RES[params["width"]], height=TINY_RES[params["height"]], steps=2,
                          seeds=[0, 1], device="cpu")
    return config


def tiny_release(path: Path, vae: Path) -> Path:
    """hdm-xut-340M.safetensors as the original's converter writes it (fp16 unet.model.*, vae.*, vae_mean /
    vae_std), for the tiny preset with the tiny text encoder's width."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from hdm_model import build_denoiser
    from tests.hdm_model.original_layouts import arch_of, converter_file_state, spec_state

    arch = arch_of(build_denoiser("tiny", ctx_dim=32).config)
    autoencoder = AutoencoderKL.from_pretrained(vae)
    save_file(converter_file_state(spec_state(arch, seed=7), autoencoder.state_dict(),
                                   vae_mean=list(autoencoder.config.latents_mean),
                                   vae_std=list(autoencoder.config.latents_std)), path)
    return path


def release_digest(path: Path) -> str:
    """sha256 of the weights a tiny training stage starts from when given the release file."""
    from hdm_model import build_denoiser
    from pipelines.train.worker import load_weights, weights_digest

    model = build_denoiser("tiny", ctx_dim=32)
    load_weights(model, str(path))
    return weights_digest(model)


def load(path: Path) -> dict:
    return tomllib.loads(path.read_text())


@pytest.mark.parametrize("path", [FINETUNE, SCRATCH], ids=["finetune", "scratch"])
def test_own_images_configs_plan_with_the_users_paths(path, monkeypatch, capsys, tmp_path):
    """`--dry-run` validates every stage; the folder and the release file come from ${HDM_IMAGES} and
    ${HDM_RELEASE}; the fine-tune starts from the release, the scratch run's first stage from nothing."""
    from jobs.run_pipeline import main

    monkeypatch.setenv("HDM_IMAGES", str(tmp_path / "images"))
    monkeypatch.setenv("HDM_RELEASE", str(tmp_path / "hdm-xut-340M.safetensors"))
    assert main([str(path), "--dry-run", "--storage", str(tmp_path / "runs")]) == 0
    assert "output " + str(tmp_path / "runs") in capsys.readouterr().out
    config = load(path)
    assert config["stages"]["precompute"]["params"]["input"] == "${HDM_IMAGES}"
    trains = {n: s for n, s in config["stages"].items() if s["kind"] == "train"}
    first = [s for s in trains.values() if not any(config["stages"][n]["kind"] == "train" for n in s["needs"])]
    assert len(first) == 1
    expected = "${HDM_RELEASE}" if path == FINETUNE else None
    assert first[0]["params"].get("init_from") == expected
    if path == FINETUNE:  # the release's model, text encoder and VAE: its weights fit nothing else
        assert (first[0]["params"]["model"], first[0]["params"]["text_encoder"]) == ("xut-base", "Qwen/Qwen3-0.6B")
        assert config["stages"]["precompute"]["params"]["vae"] == "KBlueLeaf/EQ-SDXL-VAE"


@pytest.mark.integration
def test_own_images_finetune_and_scratch_end_to_end(ray_cluster, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    from hdm_model.checkpoint import is_checkpoint
    from pipelines.tracking import (DAG_DIGEST_TAG, DAG_DONE_TAG, DAG_OUTPUT_TAG, DAG_STAGE_TAG, FINAL_WEIGHTS_TAG,
                                    INIT_FROM_TAG, INIT_WEIGHTS_TAG, PREV_RUN_TAG)
    from tests.pipelines.dag.test_pipeline_dag import run_pipeline
    from tests.tiny_models import make_tiny_text_encoder, make_tiny_vae

    uri = mlflow_server["MLFLOW_TRACKING_URI"]
    text_encoder, vae = make_tiny_text_encoder(tmp_path / "te"), make_tiny_vae(tmp_path / "vae")
    release = tiny_release(tmp_path / "hdm-xut-340M.safetensors", vae)
    os.environ["HDM_IMAGES"] = str(own_folder(tmp_path / "my images"))
    os.environ["HDM_RELEASE"] = str(release)
    client = MlflowClient(uri)
    try:
        runs = {}
        for path in (FINETUNE, SCRATCH):
            config = tiny(load(path), text_encoder=text_encoder, vae=vae, tracking_uri=uri)
            result = run_pipeline(config, ray_cluster, tmp_path / path.stem)
            assert result.returncode == 0, result.output[-6000:]
            exp = client.get_experiment_by_name(config["pipeline"]["name"])
            found = {r.data.tags.get(DAG_STAGE_TAG, "pipeline"): r for r in client.search_runs([exp.experiment_id])}
            assert set(found) == {"pipeline", *config["stages"]}
            for name in config["stages"]:
                assert found[name].info.status == "FINISHED", name
                assert found[name].data.tags[DAG_DONE_TAG] == found[name].data.tags[DAG_DIGEST_TAG], name
            runs[path] = {name: {**r.data.tags, **{"run_id": r.info.run_id}} for name, r in found.items()}
    finally:
        for name in ("HDM_IMAGES", "HDM_RELEASE"):
            os.environ.pop(name)

    def output(tags: dict, name: str) -> str:
        return tags[DAG_OUTPUT_TAG + name]

    finetune, scratch = runs[FINETUNE], runs[SCRATCH]
    # the fine-tune started from the release file's weights, exactly; the scratch run from fresh ones
    assert finetune["finetune"][INIT_FROM_TAG] == str(release)
    assert finetune["finetune"][PREV_RUN_TAG] == "none"
    assert finetune["finetune"][INIT_WEIGHTS_TAG] == release_digest(release)
    assert INIT_WEIGHTS_TAG not in scratch["train-256"] and scratch["train-256"][INIT_FROM_TAG] == "none"
    assert scratch["train-512"][INIT_FROM_TAG] == output(scratch["train-256"], "checkpoint")
    assert scratch["train-512"][INIT_WEIGHTS_TAG] == scratch["train-256"][FINAL_WEIGHTS_TAG]
    for stages in (finetune, scratch):
        for name in [n for n in stages if n.startswith(("finetune", "train-"))]:
            assert is_checkpoint(output(stages[name], "checkpoint")), name
        images = Path(output(stages["samples"], "images"))
        assert (images / "grid.png").is_file()
        assert len([p for p in images.glob("*.png") if p.name != "grid.png"]) == 2 * 2  # prompts x seeds
    # the folder's captions reached the latents: every image once, half of them captioned from NAME.txt
    rows = pq.read_table(Path(output(finetune["precompute"], "latents")) / "res=64",
                         columns=["key", "caption", "caption_source"]).to_pylist()
    assert len(rows) == 24
    assert sorted(r["caption_source"] for r in rows).count("sidecar") == 12
