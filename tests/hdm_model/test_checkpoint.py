"""hdm_model.checkpoint: the one owner of our checkpoint directory format."""

import json

import pytest
import torch

from hdm_model import build_denoiser, checkpoint
from hdm_model.config import XUTConfig


def tiny_meta(**fields) -> checkpoint.CheckpointMeta:
    return checkpoint.CheckpointMeta(model=XUTConfig.preset("tiny", ctx_dim=32), **fields)


def test_meta_round_trips_and_is_the_documented_json(tmp_path):
    meta = tiny_meta(text_encoder="Qwen/Qwen3-0.6B", max_length=77, vae="KBlueLeaf/EQ-SDXL-VAE", stage={"res": 512})
    model = build_denoiser(meta.model)
    checkpoint.save(tmp_path, weights=model.state_dict(), meta=meta)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert sorted(on_disk) == ["model", "stage", "text_encoder", "vae"]
    assert on_disk["text_encoder"] == {"id": "Qwen/Qwen3-0.6B", "max_length": 77}
    assert checkpoint.read_meta(tmp_path) == meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_a_training_checkpoint_holds_ema_and_state_and_loads_them(tmp_path):
    model = build_denoiser("tiny", ctx_dim=32)
    ema = {k: v.float() + 1 for k, v in model.state_dict().items()}
    checkpoint.save(tmp_path, weights=model.state_dict(), meta=tiny_meta(), ema=ema,
                    training_state={"step": 7, "epoch_keys": ["a", "b"]})
    assert checkpoint.is_checkpoint(tmp_path) and checkpoint.has_ema(tmp_path)
    trained, averaged = checkpoint.load_weights(tmp_path), checkpoint.load_weights(tmp_path, ema=True)
    name = next(iter(ema))
    assert torch.equal(trained[name], model.state_dict()[name]) and torch.equal(averaged[name], ema[name])
    assert checkpoint.load_training_state(tmp_path) == {"step": 7, "epoch_keys": ["a", "b"]}
    assert checkpoint.verify(tmp_path) == tiny_meta()


def test_verify_names_tensors_of_another_architecture_in_the_ema_too(tmp_path):
    model = build_denoiser("tiny", ctx_dim=32)
    other = build_denoiser("tiny", ctx_dim=32, mlp_dim=96)
    checkpoint.save(tmp_path, weights=model.state_dict(), meta=tiny_meta(), ema=other.state_dict())
    with pytest.raises(ValueError, match=r"ema\.safetensors .*wrong shapes: .*mlp\.w12\.weight \(192, 64\) != \(256, 64\)"):
        checkpoint.verify(tmp_path)


def test_older_and_partial_config_json_read_with_defaults(tmp_path):
    """save_pretrained wrote only {"model": ...} before the format had one owner, and the model section held
    ctx_size (now the training stage's ctx_length): such a directory still reads."""
    model = build_denoiser("tiny", ctx_dim=32)
    checkpoint.save(tmp_path, weights=model.state_dict(), meta=tiny_meta())
    (tmp_path / "config.json").write_text(json.dumps({"model": {**model.config.to_dict(), "ctx_size": 16}}))
    meta = checkpoint.read_meta(tmp_path)
    assert meta.model == model.config
    assert (meta.text_encoder, meta.max_length, meta.vae, meta.stage) == (None, 256, None, {})
    (tmp_path / "config.json").write_text(json.dumps({"text_encoder": {"id": "x"}}))
    with pytest.raises(ValueError, match="no \"model\" section"):
        checkpoint.read_meta(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": {"dim": "wide"}}))
    with pytest.raises(ValueError, match="not an XUTConfig"):
        checkpoint.read_meta(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory: no model.safetensors"):
        checkpoint.read_meta(tmp_path)
    assert not checkpoint.is_checkpoint(tmp_path)


def test_a_crash_while_writing_leaves_no_directory_that_reads_as_a_checkpoint(tmp_path, monkeypatch):
    """The fault injected: the disk fills while the training state is written (after the weights and EMA).
    What is left is not a checkpoint (no config.json), so nothing loads it as one."""
    model = build_denoiser("tiny", ctx_dim=32)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(tmp_path, weights=model.state_dict(), meta=tiny_meta(), ema=model.state_dict(),
                        training_state={"step": 7})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.safetensors", "model.safetensors"]
    assert not checkpoint.is_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        checkpoint.read_meta(tmp_path)
