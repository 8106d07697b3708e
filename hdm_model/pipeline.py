"""Prompts -> images: a denoiser, a text encoder and a VAE around the one sampler (hdm_spec 6, 7, 9).

    pipe = HDMPipeline.from_checkpoint("ckpt/")                        # a training stage's checkpoint
    pipe = HDMPipeline.from_official("hdm-xut-340M.safetensors")       # the released file, VAE included
    pipe = HDMPipeline.from_official("HDM-xut-340M-anime/")            # the released diffusers folder
    images = pipe(["1girl, solo"], width=768, height=1024, seeds=[0, 1])

Every prompt is drawn with every seed, prompt-major: image i has prompts[i // len(seeds)] and
seeds[i % len(seeds)]. An image depends only on its own prompt, seed and settings, never on the rest of
the call: each prompt is encoded alone (padding "longest" of one prompt = no pad tokens, as the
original's single-prompt inference), and each image's noise comes from its own
`torch.Generator(device).manual_seed(seed)`. With the default `batch_size=1` that makes a (prompt, seed,
settings) triple give the same pixels in any call on the same device and dtype. `batch_size > 1` lets the
images of one prompt share a denoiser batch (without TREAD routing only: routing draws from the image's
generator, so routed images are always sampled alone); batched kernels round differently from single
ones, so such an image can differ from the one drawn alone by float rounding (1/255 seen on CPU).

Every returned image carries its generation parameters as JSON in `image.info["parameters"]`, which
`save_png` writes into the PNG text chunk `parameters`. A call that names no CFG scale or unconditional TREAD
rate uses the pipeline's sampling defaults: a checkpoint's sampling.json (checkpoint.SamplingDefaults, chosen by
a guidance sweep), else 3.0 and no routing.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor

from . import checkpoint
from .checkpoint import SamplingDefaults, check_state_keys
from .denoiser import XUTDenoiser
from .flow import LATENT_SCALE, SamplerConfig, latent_size, sample
from .official import (TEXT_ENCODER_DIR, TOKENIZER_DIR, VAE_DIR, VAE_PREFIX, OfficialWeights,
                       load_official_hdm, read_official)
from .positions import Camera
from .text_encoder import DEFAULT_TEXT_ENCODER, TextEncoder, default_dtype
from .vae import LatentVAE

if TYPE_CHECKING:
    from PIL import Image

PARAMETERS_KEY = "parameters"  # PNG text chunk (and PIL `info` key) holding the generation parameters

# KBlueLeaf/EQ-SDXL-VAE (hdm_spec 7): the SDXL VAE architecture with per-channel latent statistics. The
# released HDM file stores this VAE under `vae.` with diffusers AutoencoderKL names (the original held a
# diffusers AutoencoderKL as its `vae` module), so these values rebuild it without a download.
EQ_SDXL_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "act_fn": "silu", "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32, "sample_size": 1024,
    "scaling_factor": 0.12746, "shift_factor": 0.86402,  # unused: the mean/std below normalise
    "latents_mean": [-3.865960634760459, -1.3353925720045965, 0.8353661802812418, 0.909888159310023],
    "latents_std": [10.036514488374861, 6.848430044716239, 7.213817552213277, 5.591315799887989],
}


class HDMPipeline:
    """Text-to-image with one denoiser, one `TextEncoder` and one `LatentVAE` (already on their device)."""

    def __init__(self, denoiser: XUTDenoiser, text_encoder: TextEncoder, vae: LatentVAE, *,
                 source: str | None = None, sampling_defaults: SamplingDefaults | None = None):
        mc = denoiser.config
        if text_encoder.hidden_size != mc.ctx_dim:
            raise ValueError(f"text encoder hidden size {text_encoder.hidden_size} != denoiser ctx_dim {mc.ctx_dim}")
        if vae.latent_channels != mc.in_channels:
            raise ValueError(f"VAE latent channels {vae.latent_channels} != denoiser channels {mc.in_channels}")
        if vae.scale_factor != LATENT_SCALE:
            raise ValueError(f"the sampler needs an f{LATENT_SCALE} VAE, got f{vae.scale_factor}")
        self.denoiser, self.text_encoder, self.vae = denoiser, text_encoder, vae  # sample() sets eval, then restores
        self.source = source  # where the weights came from; recorded in each image's parameters
        self.sampling_defaults = sampling_defaults  # guidance when a call names none (a checkpoint's sampling.json)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    # -- constructors --------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype | None = None, text_encoder: TextEncoder | str | None = None,
                        vae: LatentVAE | str | None = None, ema: bool = True) -> HDMPipeline:
        """A training stage's checkpoint directory: `model.safetensors` (our key names) and `config.json` =
        {"model": XUTConfig, "text_encoder": {"id", "max_length"}, "vae": id, "stage": ...}, and
        `ema.safetensors` when the stage kept an EMA of its weights (used unless `ema=False`), and
        `sampling.json` when a guidance sweep chose its sampling defaults (used when a call names no guidance).

        `text_encoder` / `vae` (a loaded module, or a hub id or local path) replace the checkpoint's.
        dtype None: float16 on GPU, float32 elsewhere.
        """
        directory = Path(path)
        meta = checkpoint.read_meta(directory)
        if text_encoder is None and meta.text_encoder is None:
            raise ValueError(f"{directory / checkpoint.META} names no text encoder (text_encoder.id): "
                             "pass text_encoder=")
        if vae is None and meta.vae is None:
            raise ValueError(f"{directory / checkpoint.META} names no VAE (\"vae\"): pass vae= (a hub id or a path "
                             "of a diffusers AutoencoderKL)")
        dtype = dtype or default_dtype(device)
        denoiser = load_checkpoint_denoiser(directory, device=device, dtype=dtype, ema=ema)
        if not isinstance(text_encoder, TextEncoder):
            text_encoder = TextEncoder.from_pretrained(os.fspath(text_encoder or meta.text_encoder), device=device,
                                                       dtype=dtype, max_length=meta.max_length)
        if not isinstance(vae, LatentVAE):
            vae = LatentVAE.from_pretrained(os.fspath(vae or meta.vae), device=device, dtype=dtype)
        return cls(denoiser, text_encoder, vae, source=str(directory),
                   sampling_defaults=checkpoint.read_sampling_defaults(directory))

    @classmethod
    def from_official(cls, path: str | os.PathLike, *, text_encoder: TextEncoder | str | None = None,
                      vae: LatentVAE | str | None = None, vae_config: Mapping[str, Any] | str | None = None,
                      arch: dict[str, Any] | str | os.PathLike | None = None, device: torch.device | str = "cpu",
                      dtype: torch.dtype | None = None) -> HDMPipeline:
        """The released HDM weights in either layout (hdm_formats 1-2).

        A single `.safetensors` file: denoiser under `unet.model.`, VAE under `vae.`. vae None: the file's
        own `vae.*` weights, loaded into a diffusers AutoencoderKL built from `vae_config` (a config dict,
        or a hub id / path to read one from; default EQ_SDXL_VAE_CONFIG), normalising latents with the
        file's `vae_mean` / `vae_std` where it has them. A file without VAE weights needs `vae=`.
        A diffusers folder (HDMXUTPipeline's, or its transformer/): arch from transformer/config.json, the
        VAE from vae/, the text encoder from text_encoder/ + tokenizer/ when the folder has them.
        `vae=` / `text_encoder=` (a loaded module, or a hub id or path) replace those; text_encoder None
        without one in the folder: Qwen/Qwen3-0.6B. arch: the original's `config/arch` (default: the
        folder's, else the released xut-base).
        """
        dtype = dtype or default_dtype(device)
        weights = read_official(path)
        if vae is None:
            vae = official_vae(weights, config=vae_config, device=device, dtype=dtype)
        elif not isinstance(vae, LatentVAE):
            vae = LatentVAE.from_pretrained(os.fspath(vae), device=device, dtype=dtype)
        denoiser = load_official_hdm(weights, arch, device=device, dtype=dtype)
        if not isinstance(text_encoder, TextEncoder):
            text_encoder = official_text_encoder(text_encoder, weights, device=device, dtype=dtype)
        return cls(denoiser, text_encoder, vae, source=str(path))

    # -- sampling ------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], *, negative_prompt: str = "", width: int = 1024,
                 height: int = 1024, steps: int = 24, cfg_scale: float | None = None,
                 seeds: Sequence[int] | int | None = None, camera: Camera | None = None,
                 cond_tread_rate: float | None = None, uncond_tread_rate: float | None = None,
                 batch_size: int = 1) -> list[Image.Image]:
        """len(prompts) * len(seeds) PIL images, prompt-major (see the module doc).

        cfg_scale / uncond_tread_rate None: the pipeline's sampling defaults (`guidance`); 1.0 / 0 turn
        guidance / routing off. The values used go into each image's parameters.
        seeds: an int or a list (every prompt is drawn with each); None draws one seed at random, which
        each image's `info["parameters"]` records. Width and height: multiples of 16 px, any aspect ratio.
        batch_size: images of one prompt per denoiser batch; 1 keeps every image bit-reproducible.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts: pass at least one")
        seeds = _seed_list(seeds)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        cfg_scale, uncond_tread_rate = self.guidance(cfg_scale, uncond_tread_rate)
        config = SamplerConfig(steps=steps, cfg_scale=cfg_scale, cond_tread_rate=cond_tread_rate,
                               uncond_tread_rate=uncond_tread_rate)
        latent_size(height, width, patch_size=self.denoiser.config.patch_size)  # refuses a bad size early
        camera = camera or Camera()
        uncond = self._encode(negative_prompt) if config.cfg_scale != 1.0 else None
        common = {"negative_prompt": negative_prompt, "width": width, "height": height, **asdict(config),
                  "camera": asdict(camera), "sampler": "euler", "batch_size": batch_size,
                  "dtype": str(self.dtype).removeprefix("torch."), "model": self.source}
        images = []
        for prompt in prompts:
            cond = self._encode(prompt)  # (1, T, ctx_dim)
            for start in range(0, len(seeds), batch_size):
                chunk = seeds[start:start + batch_size]
                latents = self._sample(cond, uncond, chunk, height=height, width=width, config=config, camera=camera)
                for seed, image in zip(chunk, to_pil(self.vae.decode(latents.to(self.vae.mean.device)))):
                    image.info[PARAMETERS_KEY] = json.dumps({"prompt": prompt, "seed": seed, **common})
                    images.append(image)
        return images

    def guidance(self, cfg_scale: float | None = None, uncond_tread_rate: float | None = None
                 ) -> tuple[float, float | None]:
        """The (cfg_scale, uncond_tread_rate) a call with these arguments samples with: each one given wins,
        else the pipeline's `sampling_defaults` (a checkpoint's sampling.json), else SamplerConfig's (3.0,
        unrouted)."""
        defaults = self.sampling_defaults
        if cfg_scale is None:
            cfg_scale = defaults.cfg_scale if defaults else SamplerConfig.cfg_scale
        if uncond_tread_rate is None and defaults:
            uncond_tread_rate = defaults.uncond_tread_rate
        return cfg_scale, uncond_tread_rate

    def _encode(self, prompt: str) -> Tensor:
        """(1, T, ctx_dim) states of one prompt on the denoiser's device, no pad tokens (hdm_spec 6)."""
        return self.text_encoder([prompt], padding="longest").to(self.device)

    def _sample(self, cond: Tensor, uncond: Tensor | None, seeds: list[int], *, height: int, width: int,
                config: SamplerConfig, camera: Camera) -> Tensor:
        """Latents (n, C, h, w) of one prompt, image i from its own generator seeded with seeds[i]."""
        h, w = latent_size(height, width, patch_size=self.denoiser.config.patch_size)
        generators = [torch.Generator(self.device).manual_seed(seed) for seed in seeds]
        # The noise sample() would draw from each generator for a batch of one.
        noise = [torch.randn((1, self.denoiser.config.in_channels, h, w), generator=g, device=g.device)
                 for g in generators]
        run = dict(uncond=uncond, height=height, width=width, config=config, camera=camera)
        if config.cond_tread_rate or config.uncond_tread_rate:  # routing draws from the generator: one by one
            return torch.cat([sample(self.denoiser, cond, noise=n, generator=g, **run)
                              for n, g in zip(noise, generators)])
        return sample(self.denoiser, cond.expand(len(seeds), -1, -1), noise=torch.cat(noise), **run)


# ---------------------------------------------------------------------------------------------------
# Loading

def load_checkpoint_denoiser(directory: str | os.PathLike, *, device: torch.device | str = "cpu",
                             dtype: torch.dtype | None = None, ema: bool = False) -> XUTDenoiser:
    """The denoiser of a checkpoint directory, after checking its tensors against its config (checkpoint.verify).
    With `ema`, the EMA weights (`ema.safetensors`) replace the trained ones where the checkpoint has them."""
    checkpoint.verify(directory)
    model = XUTDenoiser.from_pretrained(directory, device=device, ema=ema)
    return model.to(dtype=dtype) if dtype is not None else model


def official_vae(weights: OfficialWeights, *, config: Mapping[str, Any] | str | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> LatentVAE:
    """The VAE of released weights: a diffusers folder's vae/, or the single file's `vae.*` tensors
    (diffusers AutoencoderKL names after the prefix) loaded into an AutoencoderKL built from `config`
    (default EQ_SDXL_VAE_CONFIG), with the file's `vae_mean` / `vae_std` as its latent statistics."""
    from diffusers import AutoencoderKL

    dtype = dtype or default_dtype(device)
    folder_vae = weights.component(VAE_DIR)
    if folder_vae is not None and not weights.vae:
        return LatentVAE.from_pretrained(os.fspath(folder_vae), device=device, dtype=dtype)
    if not weights.vae:
        raise ValueError(f"{weights.source} holds no VAE weights (no '{VAE_PREFIX}*' keys, no {VAE_DIR}/): pass "
                         "vae= (a hub id or a path of a diffusers AutoencoderKL, e.g. KBlueLeaf/EQ-SDXL-VAE)")
    if isinstance(config, str):
        config = AutoencoderKL.load_config(config)
    config = dict(config if config is not None else EQ_SDXL_VAE_CONFIG)
    if weights.latent_mean is not None and weights.latent_std is not None:  # the file's own statistics win
        config.update(latents_mean=weights.latent_mean.tolist(), latents_std=weights.latent_std.tolist())
    with torch.device("meta"):
        model = AutoencoderKL.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_keys({k: tuple(v.shape) for k, v in weights.vae.items()}, expected,
                     what=f"the '{VAE_PREFIX}*' weights of {weights.source} (pass vae= to use another VAE)")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in weights.vae.items()}, assign=True)
    return LatentVAE(model).to(device)


def official_text_encoder(text_encoder: str | os.PathLike | None, weights: OfficialWeights, *,
                          device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> TextEncoder:
    """`text_encoder` (a hub id or path) when given; else the diffusers folder's text_encoder/ +
    tokenizer/ when it has both; else DEFAULT_TEXT_ENCODER."""
    model_dir, tokenizer_dir = weights.component(TEXT_ENCODER_DIR), weights.component(TOKENIZER_DIR)
    if text_encoder is not None or model_dir is None or tokenizer_dir is None:
        return TextEncoder.from_pretrained(os.fspath(text_encoder or DEFAULT_TEXT_ENCODER), device=device,
                                           dtype=dtype)
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(model_dir, dtype=dtype or default_dtype(device))
    return TextEncoder(model.to(device), AutoTokenizer.from_pretrained(tokenizer_dir))


# ---------------------------------------------------------------------------------------------------
# Images

def _seed_list(seeds: Sequence[int] | int | None) -> list[int]:
    if seeds is None:
        return [secrets.randbelow(2**31)]
    seeds = [seeds] if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty: pass an int, a list of ints, or None for a random one")
    return seeds


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> B RGB PIL images."""
    from PIL import Image

    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray(p) for p in pixels]


def make_grid(images: Sequence[Image.Image], *, cols: int) -> Image.Image:
    """Tiles of equal size, row-major: tile (r, c) is images[r * cols + c]; size cols*W x ceil(n/cols)*H."""
    from PIL import Image

    if not images or cols < 1:
        raise ValueError(f"a grid needs images and cols >= 1, got {len(images)} images, cols={cols}")
    w, h = images[0].size
    if any(im.size != (w, h) for im in images):
        raise ValueError(f"grid tiles differ in size: {sorted({im.size for im in images})}")
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


def save_png(image: Image.Image, path: str | os.PathLike, *, parameters: Mapping[str, Any] | None = None) -> Path:
    """Write a PNG whose `parameters` text chunk holds JSON: `parameters`, else the image's own
    `info["parameters"]` (set by HDMPipeline)."""
    from PIL.PngImagePlugin import PngInfo

    text = json.dumps(dict(parameters)) if parameters is not None else image.info.get(PARAMETERS_KEY)
    info = PngInfo()
    if text is not None:
        info.add_text(PARAMETERS_KEY, text)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_parameters(path: str | os.PathLike) -> dict[str, Any]:
    """The generation parameters stored by `save_png` ({} when the PNG has none)."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.info.get(PARAMETERS_KEY)
    return json.loads(text) if text else {}
