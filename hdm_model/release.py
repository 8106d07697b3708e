"""Export for the original HDM's tools (hdm_formats 1, 2, 4): the single-file release and the diffusers folder.

    save_official_hdm(model, "hdm.safetensors", vae=vae)                          # what the converter writes
    save_official_hdm(model, "hdm-folder/", vae=vae, layout="diffusers", text_encoder=te)

Names, prefixes and file names come from hdm_model.official, which reads both layouts back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from .denoiser import XUTDenoiser
from .official import (DENOISER_PREFIX, DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS, MODEL_INDEX, PIPELINE_CLASS,
                       SCHEDULER_DIR, TEXT_ENCODER_DIR, TOKENIZER_DIR, TRANSFORMER_CLASS, TRANSFORMER_DIR,
                       TRANSFORMER_PREFIX, VAE_DIR, VAE_PREFIX, official_arch, ours_to_official)
from .vae import LatentVAE, latent_stats

if TYPE_CHECKING:
    from .text_encoder import TextEncoder

Layout = Literal["file", "diffusers"]
RELEASE_DTYPE = torch.float16  # the converter casts every tensor with .half()


def release_state(model: XUTDenoiser, *, vae: LatentVAE | nn.Module | None = None) -> dict[str, Tensor]:
    """The single file's state dict: `unet.model.*` (time table included), and with a VAE `vae.*` plus the
    trainer buffers `vae_mean` / `vae_std` (1, C, 1, 1); every tensor fp16, as the original's converter."""
    state = ours_to_official(model, prefix=DENOISER_PREFIX)
    if vae is not None:
        autoencoder = _autoencoder(vae)
        state.update({VAE_PREFIX + k: v for k, v in autoencoder.state_dict().items()})
        mean, std = _latent_stats(vae)
        state.update(vae_mean=mean.reshape(1, -1, 1, 1), vae_std=std.reshape(1, -1, 1, 1))  # (1, C, 1, 1)
    return {k: v.detach().to("cpu", RELEASE_DTYPE).contiguous() for k, v in state.items()}


def save_official_hdm(model: XUTDenoiser, path: str | os.PathLike, *, vae: LatentVAE | nn.Module | None = None,
                      layout: Layout = "file", text_encoder: TextEncoder | None = None,
                      text_tokens: int = 256) -> Path:
    """Write `model` (and `vae`, a LatentVAE or a diffusers AutoencoderKL) in a layout of the original:

    "file": one `.safetensors` as the original's converter writes it (`release_state`); text_encoder is
    not part of it (the converter strips it). "diffusers": the folder HDMXUTPipeline.from_pretrained
    reads: model_index.json, transformer/ (config.json + diffusion_pytorch_model.safetensors, the model's
    dtype), vae/ and text_encoder/ + tokenizer/ (a TextEncoder's .model and .tokenizer) when given.
    `text_tokens`: the padding length the weights were trained with, the folder's `ctx_size`.
    """
    path = Path(path)
    if layout == "file":
        if text_encoder is not None:
            raise ValueError("the single-file layout holds no text encoder (the original strips it): "
                             "use layout='diffusers' to ship one")
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(release_state(model, vae=vae), path)
        return path
    if layout != "diffusers":
        raise ValueError(f"layout must be 'file' or 'diffusers', got {layout!r}")
    _save_transformer(model, path / TRANSFORMER_DIR, text_tokens=text_tokens)
    if vae is not None:
        _save_vae(vae, path / VAE_DIR)
    if text_encoder is not None:
        text_encoder.model.save_pretrained(path / TEXT_ENCODER_DIR)
        text_encoder.tokenizer.save_pretrained(path / TOKENIZER_DIR)
    components = {TRANSFORMER_DIR: model, VAE_DIR: vae, TEXT_ENCODER_DIR: text_encoder, SCHEDULER_DIR: None}
    (path / MODEL_INDEX).write_text(json.dumps(model_index(**components), indent=2, sort_keys=True) + "\n")
    return path


def model_index(**components: Any) -> dict[str, Any]:
    """model_index.json as DiffusionPipeline.register_modules records it: `[library, class]` per component
    (`[null, null]` for an absent one); the transformer is the original's XUDiTConditionModel."""
    import diffusers

    entries: dict[str, Any] = {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers.__version__}
    text_encoder = components.pop(TEXT_ENCODER_DIR)
    parts = {**components, TEXT_ENCODER_DIR: text_encoder and text_encoder.model,
             TOKENIZER_DIR: text_encoder and text_encoder.tokenizer}
    for name, module in parts.items():
        if name == TRANSFORMER_DIR:
            entries[name] = list(TRANSFORMER_CLASS)
        elif module is None:
            entries[name] = [None, None]
        else:
            module = _autoencoder(module) if name == VAE_DIR else module
            entries[name] = [type(module).__module__.split(".")[0], type(module).__name__]
    return entries


def _save_transformer(model: XUTDenoiser, directory: Path, *, text_tokens: int) -> None:
    """XUDiTConditionModel.save_pretrained's files: config.json (its arguments) and the weights under `model.`."""
    import diffusers
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": TRANSFORMER_CLASS[1], "_diffusers_version": diffusers.__version__,
              **official_arch(model.config, ctx_size=text_tokens)}
    (directory / DIFFUSERS_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = ours_to_official(model, prefix=TRANSFORMER_PREFIX)
    time_table = TRANSFORMER_PREFIX + "time_emb.freqs"
    state[time_table] = state[time_table].to(model.unpatch.weight.dtype)  # the model's dtype, as save_pretrained
    save_file({k: v.cpu().contiguous() for k, v in state.items()}, directory / DIFFUSERS_WEIGHTS,
              metadata={"format": "pt"})


def _save_vae(vae: LatentVAE | nn.Module, directory: Path) -> None:
    """The AutoencoderKL's save_pretrained, its config carrying latents_mean / latents_std (the original
    pipeline normalises with them): a VAE normalised by scaling/shift factors gets them written in."""
    _autoencoder(vae).save_pretrained(directory)
    config = json.loads((directory / DIFFUSERS_CONFIG).read_text())
    if config.get("latents_mean") is None or config.get("latents_std") is None:
        mean, std = _latent_stats(vae)
        config.update(latents_mean=mean.tolist(), latents_std=std.tolist())
        (directory / DIFFUSERS_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@dataclass
class ExportSummary:
    """What `export_checkpoint` wrote: safetensors tensors and their elements, counted from the files."""

    path: str
    layout: str
    source: str
    ema: bool
    files: dict[str, tuple[int, int]] = field(default_factory=dict)  # relative path -> (tensors, elements)

    def format(self) -> str:
        lines = [f"export: {self.layout} layout of {self.source} ({'EMA' if self.ema else 'trained'} weights) "
                 f"-> {self.path}"]
        lines += [f"  {name}: {n} tensors, {numel:,} values" for name, (n, numel) in self.files.items()]
        return "\n".join(lines)


def export_checkpoint(directory: str | os.PathLike, output: str | os.PathLike, *, layout: Layout = "file",
                      ema: bool = True, vae: str | os.PathLike | None = None,
                      text_encoder: str | os.PathLike | None = None, max_length: int = 256) -> ExportSummary:
    """A training checkpoint directory (hdm_model.pipeline's contract) in a layout of the original.

    ema: the EMA weights where the checkpoint has them. vae / text_encoder: local paths or hub ids of a
    diffusers AutoencoderKL / a transformers encoder to ship with it (None: leave out).
    """
    from .checkpoint import has_ema
    from .pipeline import load_checkpoint_denoiser
    from .text_encoder import TextEncoder

    directory = Path(directory)
    model = load_checkpoint_denoiser(directory, ema=ema)
    latent_vae = LatentVAE.from_pretrained(os.fspath(vae), dtype=torch.float32) if vae is not None else None
    encoder = (TextEncoder.from_pretrained(os.fspath(text_encoder), dtype=torch.float32, max_length=max_length)
               if text_encoder is not None else None)
    path = save_official_hdm(model, output, vae=latent_vae, layout=layout, text_encoder=encoder,
                             text_tokens=max_length)
    summary = ExportSummary(path=str(path), layout=layout, source=str(directory),
                            ema=ema and has_ema(directory))
    for file in sorted([path] if path.is_file() else path.rglob("*.safetensors")):
        summary.files[str(file.relative_to(path.parent if path.is_file() else path))] = _count(file)
    return summary


def _count(file: Path) -> tuple[int, int]:
    from math import prod

    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        shapes = [f.get_slice(k).get_shape() for k in f.keys()]
    return len(shapes), sum(prod(s) for s in shapes)


def _autoencoder(vae: LatentVAE | nn.Module) -> nn.Module:
    return vae.vae if isinstance(vae, LatentVAE) else vae


def _latent_stats(vae: LatentVAE | nn.Module) -> tuple[Tensor, Tensor]:
    """(C,) mean and std with z = (latent - mean) / std."""
    if isinstance(vae, LatentVAE):
        return vae.mean.reshape(-1).float().cpu(), vae.std.reshape(-1).float().cpu()
    return latent_stats(vae.config)
