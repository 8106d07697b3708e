"""jobs/export.py on a checkpoint directory written to the contract (tiny real models), both layouts."""

import json

import pytest
import torch
from safetensors.torch import load_file

from hdm_model import HDMPipeline, build_denoiser, load_official_hdm
from jobs import export as export_job

from tests.hdm_model.original_layouts import arch_of, spec_shapes
from tests.tiny_models import make_tiny_text_encoder, make_tiny_vae, write_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """model.safetensors + ema.safetensors + config.json as the training stage writes them."""
    root = tmp_path_factory.mktemp("export")
    te_dir, vae_dir = make_tiny_text_encoder(root / "te"), make_tiny_vae(root / "vae")
    torch.manual_seed(0)
    model = build_denoiser("tiny")
    ema = {k: v + 0.01 for k, v in model.state_dict().items()}
    directory = write_tiny_checkpoint(root / "ckpt", model=model, text_encoder=te_dir, vae=vae_dir,
                                      stage={"res": 256, "step": 3}, ema=ema)
    return dict(dir=directory, model=model, ema=ema, root=root)


def test_file_layout_with_ema_and_vae(checkpoint, tmp_path, capsys):
    out = tmp_path / "hdm.safetensors"
    assert export_job.main(["--checkpoint", str(checkpoint["dir"]), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    state = load_file(out)
    n_unet = len(spec_shapes(arch_of(checkpoint["model"].config)))
    assert f"hdm.safetensors: {len(state)} tensors" in printed and "EMA weights" in printed
    assert sum(k.startswith("unet.model.") for k in state) == n_unet and "vae_mean" in state
    loaded = load_official_hdm(out, arch_of(checkpoint["model"].config))
    ema = {k: v.half().float() for k, v in checkpoint["ema"].items()}
    assert all(torch.equal(v, ema[k]) for k, v in loaded.state_dict().items())


def test_diffusers_layout_without_ema_or_vae(checkpoint, tmp_path, capsys):
    out = tmp_path / "folder"
    args = ["--checkpoint", str(checkpoint["dir"]), "--layout", "diffusers", "--output", str(out), "--no-ema"]
    assert export_job.main(args + ["--no-vae"]) == 0
    assert "transformer/diffusion_pytorch_model.safetensors" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "text_encoder", "tokenizer", "transformer"]
    trained = checkpoint["model"].state_dict()
    loaded = load_official_hdm(out)
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())
    assert export_job.main(args) == 0  # now with the checkpoint's VAE: the folder samples on its own
    pipe = HDMPipeline.from_official(out, dtype=torch.float32)
    assert pipe(["red square"], width=64, height=48, steps=1, seeds=0)[0].size == (64, 48)


def test_refusals(checkpoint, tmp_path, capsys):
    meta = json.loads((checkpoint["dir"] / "config.json").read_text())
    bare = tmp_path / "bare"
    checkpoint["model"].save_pretrained(bare)
    (bare / "config.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "vae"}))
    assert export_job.main(["--checkpoint", str(bare), "--output", str(tmp_path / "x.safetensors")]) == 3
    assert "names no VAE; pass --no-vae" in capsys.readouterr().err
    assert export_job.main(["--output", str(tmp_path / "x.safetensors")]) == 2  # no source
