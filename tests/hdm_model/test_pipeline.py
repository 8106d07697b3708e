"""HDMPipeline on real tiny models (a 2-layer Qwen3, an f8 AutoencoderKL, the tiny denoiser), CPU."""

import json

import numpy as np
import pytest
import torch

from hdm_model import (Camera, HDMPipeline, LatentVAE, TextEncoder, build_denoiser, make_grid, ours_to_official,
                       read_parameters, save_png)
from hdm_model import checkpoint
from hdm_model.pipeline import PARAMETERS_KEY

from ..tiny_models import make_tiny_text_encoder, make_tiny_vae
from .conftest import _randomise_zero_inits
from .original_layouts import arch_of

SMALL = dict(width=64, height=48, steps=3)  # 6 x 8 latent, 3 x 4 patch grid


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Paths of a tiny text encoder and VAE, and a tiny denoiser whose ctx_dim is the encoder's width."""
    root = tmp_path_factory.mktemp("parts")
    te_dir, vae_dir = make_tiny_text_encoder(root / "te"), make_tiny_vae(root / "vae")
    text_encoder = TextEncoder.from_pretrained(str(te_dir))
    torch.manual_seed(0)
    denoiser = build_denoiser("tiny", ctx_dim=text_encoder.hidden_size)
    _randomise_zero_inits(denoiser)  # zero-init gates would hide the prompt and the camera
    return dict(te_dir=te_dir, vae_dir=vae_dir, text_encoder=text_encoder, denoiser=denoiser,
                vae=LatentVAE.from_pretrained(str(vae_dir)))


@pytest.fixture(scope="module")
def pipe(parts):
    return HDMPipeline(parts["denoiser"], parts["text_encoder"], parts["vae"])


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def assert_same(a, b) -> None:
    np.testing.assert_array_equal(pixels(a), pixels(b))


def test_one_image_per_prompt_and_seed_prompt_major(pipe):
    images = pipe(["a photo of a cat", "red square"], seeds=[0, 1, 2], **SMALL)
    assert len(images) == 6 and all(im.size == (64, 48) and im.mode == "RGB" for im in images)
    meta = [json.loads(im.info[PARAMETERS_KEY]) for im in images]
    assert [(m["prompt"], m["seed"]) for m in meta] == [(p, s) for p in ("a photo of a cat", "red square")
                                                        for s in (0, 1, 2)]
    assert meta[0]["steps"] == 3 and meta[0]["cfg_scale"] == 3.0 and meta[0]["width"] == 64


def test_same_seed_same_image_whatever_else_is_in_the_call(pipe):
    many = pipe(["a photo of a cat", "red square"], seeds=[0, 1, 2], **SMALL)
    alone = pipe(["red square"], seeds=1, **SMALL)
    assert_same(many[4], alone[0])
    routed = dict(cond_tread_rate=0.25, uncond_tread_rate=0.5, **SMALL)  # routing draws from the seed too
    assert_same(pipe(["red square", "a cat"], seeds=[7, 1], **routed)[1], pipe(["red square"], seeds=1, **routed)[0])


def test_batching_changes_at_most_float_rounding(pipe):
    single = pipe(["red square"], seeds=[0, 1, 2], **SMALL)
    batched = pipe(["red square"], seeds=[0, 1, 2], batch_size=3, **SMALL)
    for a, b in zip(single, batched):
        assert np.abs(pixels(a) - pixels(b)).max() <= 2


def test_different_seeds_and_prompts_differ(pipe):
    a, b = pipe(["red square"], seeds=[0, 1], **SMALL)
    c = pipe(["a photo of a cat"], seeds=0, **SMALL)[0]
    assert np.abs(pixels(a) - pixels(b)).mean() > 5
    assert np.abs(pixels(a) - pixels(c)).max() > 0


@pytest.mark.parametrize("width, height", [(96, 64), (64, 96), (32, 32)])
def test_any_aspect_ratio(pipe, width, height):
    image = pipe(["a photo of a cat"], width=width, height=height, steps=2, seeds=0)[0]
    assert image.size == (width, height)


def test_camera_shift_changes_the_image_and_a_zero_shift_does_not(pipe):
    plain = pipe(["red square"], seeds=3, **SMALL)[0]
    assert_same(plain, pipe(["red square"], seeds=3, camera=Camera(zoom=1.0, x_shift=0.0, y_shift=0.0), **SMALL)[0])
    for camera in (Camera(x_shift=0.5), Camera(y_shift=-0.5), Camera(zoom=2.0)):
        moved = pipe(["red square"], seeds=3, camera=camera, **SMALL)[0]
        assert np.abs(pixels(moved) - pixels(plain)).max() > 0, camera


def test_grid_layout(pipe):
    images = pipe(["red square", "a photo of a cat"], seeds=[0, 1, 2], **SMALL)
    grid = make_grid(images, cols=3)
    assert grid.size == (3 * 64, 2 * 48)
    for i, image in enumerate(images):
        r, c = divmod(i, 3)
        assert_same(grid.crop((c * 64, r * 48, (c + 1) * 64, (r + 1) * 48)), image)
    with pytest.raises(ValueError, match="differ in size"):
        make_grid([images[0], images[0].resize((32, 32))], cols=2)


def test_png_carries_the_parameters(pipe, tmp_path):
    image = pipe(["red square"], seeds=None, negative_prompt="blurry", **SMALL)[0]  # a random seed, recorded
    path = save_png(image, tmp_path / "a.png")
    params = read_parameters(path)
    assert params == json.loads(image.info[PARAMETERS_KEY])
    assert params["negative_prompt"] == "blurry" and params["camera"] == {"zoom": 1.0, "x_shift": 0.0, "y_shift": 0.0}
    assert_same(pipe(["red square"], seeds=params["seed"], negative_prompt="blurry", **SMALL)[0], image)
    assert read_parameters(save_png(image, tmp_path / "b.png", parameters={"k": 1})) == {"k": 1}


def write_checkpoint(directory, parts, *, vae=True):
    """A checkpoint directory as the training stage writes it (hdm_model.checkpoint, the format's owner)."""
    meta = checkpoint.CheckpointMeta(model=parts["denoiser"].config, text_encoder=str(parts["te_dir"]), max_length=16,
                                     vae=str(parts["vae_dir"]) if vae else None, stage={"res": 256, "step": 10})
    return checkpoint.save(directory, weights=parts["denoiser"].state_dict(), meta=meta)


def test_checkpoint_directory_samples_what_its_weights_sample(pipe, parts, tmp_path):
    loaded = HDMPipeline.from_checkpoint(write_checkpoint(tmp_path / "ckpt", parts), dtype=torch.float32)
    assert loaded.text_encoder.max_length == 16 and loaded.source == str(tmp_path / "ckpt")
    assert_same(loaded(["red square"], seeds=5, **SMALL)[0], pipe(["red square"], seeds=5, **SMALL)[0])


def test_official_file_with_its_vae_samples_what_its_weights_sample(pipe, parts, tmp_path):
    from safetensors.torch import save_file

    state = ours_to_official(parts["denoiser"])
    state.update({f"vae.{k}": v.contiguous() for k, v in parts["vae"].vae.state_dict().items()})
    save_file(state, tmp_path / "hdm.safetensors")
    loaded = HDMPipeline.from_official(tmp_path / "hdm.safetensors", text_encoder=str(parts["te_dir"]),
                                       vae_config=str(parts["vae_dir"]), arch=arch_of(parts["denoiser"].config),
                                       dtype=torch.float32)
    assert_same(loaded(["red square"], seeds=5, **SMALL)[0], pipe(["red square"], seeds=5, **SMALL)[0])
    # The default VAE config is EQ-SDXL-VAE's: the tiny VAE's tensors do not fit it, and are named.
    with pytest.raises(ValueError, match=r"vae\.\*.*missing keys: decoder\.up_blocks\.0\.resnets\.2.*"
                                         r"wrong shapes: decoder\.conv_in\.bias \(16,\) != \(512,\)"):
        HDMPipeline.from_official(tmp_path / "hdm.safetensors", text_encoder=parts["text_encoder"],
                                  arch=arch_of(parts["denoiser"].config))


def test_clear_errors(pipe, parts, tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ValueError, match="no prompts"):
        pipe([], **SMALL)
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe(["red square"], width=72, height=64, steps=1)
    # No VAE in the checkpoint and none given; an official file without vae.* and none given.
    bare = write_checkpoint(tmp_path / "bare", parts, vae=False)
    with pytest.raises(ValueError, match="names no VAE.*pass vae="):
        HDMPipeline.from_checkpoint(bare)
    given = HDMPipeline.from_checkpoint(bare, vae=str(parts["vae_dir"]), dtype=torch.float32)
    assert_same(given(["red square"], seeds=5, **SMALL)[0], pipe(["red square"], seeds=5, **SMALL)[0])
    save_file(ours_to_official(parts["denoiser"]), tmp_path / "novae.safetensors")
    with pytest.raises(ValueError, match="no VAE weights.*pass vae="):
        HDMPipeline.from_official(tmp_path / "novae.safetensors", text_encoder=parts["text_encoder"],
                                  arch=arch_of(parts["denoiser"].config))
    # Weights of another architecture than the config (an official arch, a checkpoint's config.json): named.
    with pytest.raises(KeyError, match=r"do not match the arch: missing keys: backbone\.dec_blocks\.0\.2\."):
        HDMPipeline.from_official(tmp_path / "novae.safetensors", text_encoder=parts["text_encoder"], vae=parts["vae"])
    other = write_checkpoint(tmp_path / "other", parts)
    build_denoiser("tiny", ctx_dim=32, depth=3, mlp_dim=96).save_pretrained(tmp_path / "deeper")
    (tmp_path / "deeper" / "model.safetensors").replace(other / "model.safetensors")
    with pytest.raises(ValueError, match=r"does not match the architecture: unexpected keys: backbone\.decoder\.2\..*"
                                         r"wrong shapes: .*mlp\.w12\.weight \(192, 64\) != \(256, 64\)"):
        HDMPipeline.from_checkpoint(other)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HDMPipeline.from_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="is a directory.*from_checkpoint"):
        HDMPipeline.from_official(other)
    with pytest.raises(ValueError, match="hidden size 32 != denoiser ctx_dim 48"):
        HDMPipeline(build_denoiser("tiny", ctx_dim=48), parts["text_encoder"], parts["vae"])


def test_default_official_vae_is_the_sdxl_architecture_with_eq_vae_statistics():
    from diffusers import AutoencoderKL

    from hdm_model.pipeline import EQ_SDXL_VAE_CONFIG
    from hdm_model.vae import latent_stats

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(EQ_SDXL_VAE_CONFIG)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # the SD/SDXL f8 VAE
    mean, std = latent_stats(vae.config)
    assert mean[0].item() == pytest.approx(-3.865960634760459) and std[3].item() == pytest.approx(5.591315799887989)
