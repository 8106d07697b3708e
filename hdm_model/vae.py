"""VAE wrapper over diffusers `AutoencoderKL` (hdm_spec 7): images <-> normalised latents.

The denoiser works on z = (latent - mean) / std with per-channel `latents_mean` / `latents_std` from the
VAE config when present (EQ-SDXL-VAE), else z = (latent - shift_factor) * scaling_factor.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .text_encoder import default_dtype

DEFAULT_VAE = "KBlueLeaf/EQ-SDXL-VAE"


class LatentVAE(nn.Module):
    def __init__(self, vae: nn.Module, *, chunk_size: int = 4):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.chunk_size = chunk_size
        mean, std = latent_stats(vae.config)
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1), persistent=False)  # (1, C, 1, 1)
        self.register_buffer("std", std.reshape(1, -1, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, model_id: str = DEFAULT_VAE, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype | None = None, chunk_size: int = 4, **kwargs) -> LatentVAE:
        from importlib.util import find_spec

        from diffusers import AutoencoderKL

        kwargs.setdefault("low_cpu_mem_usage", find_spec("accelerate") is not None)  # no warning without it
        vae = AutoencoderKL.from_pretrained(model_id, torch_dtype=dtype or default_dtype(device), **kwargs)
        return cls(vae, chunk_size=chunk_size).to(device)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def train(self, mode: bool = True) -> LatentVAE:  # always frozen
        return super().train(False)

    @torch.no_grad()
    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 3, H, W) in [-1, 1] -> normalised posterior (mean, std), each (B, C, H/f, W/f) float32.

        A training sample is mean + std * eps (hdm_spec 4 samples the posterior, not its mode).
        """
        means, stds = [], []
        dtype = self.vae.dtype
        for chunk in images.split(self.chunk_size):
            dist = self.vae.encode(chunk.to(self.mean.device, dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        mean, std = torch.cat(means), torch.cat(stds)
        return (mean - self.mean) / self.std, std / self.std

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents (B, C, h, w) -> images (B, 3, h*f, w*f) in [0, 1], float32."""
        images = []
        for chunk in z.split(self.chunk_size):
            latent = chunk.float() * self.std + self.mean
            images.append(self.vae.decode(latent.to(self.vae.dtype)).sample.float())
        return ((torch.cat(images) + 1) / 2).clamp(0, 1)


def latent_stats(config: Mapping[str, Any] | Any) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, std) such that z = (latent - mean) / std, from a diffusers VAE config
    (the model's `.config` or the dict of `AutoencoderKL.load_config`)."""
    get = config.get if isinstance(config, Mapping) else lambda name, default=None: getattr(config, name, default)
    channels = get("latent_channels")
    mean, std = get("latents_mean"), get("latents_std")
    if mean is not None and std is not None:
        mean, std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        if mean.numel() != channels or std.numel() != channels:
            raise ValueError(f"latents_mean/std need {channels} values, got {mean.numel()}/{std.numel()}")
        return mean, std
    scaling = get("scaling_factor") or 1.0
    shift = get("shift_factor") or 0.0
    return torch.full((channels,), float(shift)), torch.full((channels,), 1.0 / float(scaling))
