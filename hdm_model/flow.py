"""Rectified-flow objective and sampler (hdm_spec 4, 9); the network knows nothing of either.

Convention: x_t = t * eps + (1 - t) * z0, so t = 1 is pure noise; the model predicts v = eps - z0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .positions import Camera

LATENT_SCALE = 8  # pixels per latent cell of the f8 VAE


def sample_timesteps(batch: int, *, device: torch.device | str | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
    """Logit-normal t = sigmoid(n), n ~ N(0, 1): (B,). No resolution-dependent shift."""
    return torch.sigmoid(torch.randn(batch, device=device, generator=generator))


def interpolate(z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = t * noise + (1 - t) * z0, t (B,) broadcast over the latent."""
    t = t.reshape(-1, *([1] * (z0.ndim - 1)))
    return t * noise + (1 - t) * z0


def velocity_target(z0: Tensor, noise: Tensor) -> Tensor:
    return noise - z0


def flow_matching_loss(model: nn.Module, z0: Tensor, ctx: Tensor, *, pos_map: Tensor | None = None,
                       aspect: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Plain MSE between the predicted and the target velocity, mean over every element.

    Noise, timesteps and the TREAD routing mask all draw from `generator` (on z0's device) when one is given.
    The loss is not checked here: a finiteness check would wait for the GPU every micro-step; the caller checks
    when it reads the loss.
    """
    noise = torch.randn(z0.shape, device=z0.device, dtype=z0.dtype, generator=generator)
    t = sample_timesteps(z0.shape[0], device=z0.device, generator=generator)
    v = model(interpolate(z0, noise, t), t, ctx, pos_map=pos_map, aspect=aspect, generator=generator)
    return F.mse_loss(v.float(), velocity_target(z0, noise).float())


@dataclass(frozen=True)
class SamplerConfig:
    """Euler sampling with classifier-free guidance and TREAD auto-guidance.

    `cond_tread_rate` / `uncond_tread_rate` route that fraction of image tokens around the backbone in the
    conditional / unconditional pass (None or 0 = no routing). A weaker unconditional branch (higher rate)
    is the report's auto-guidance; 0 means off here, unlike the original pipeline where 0 meant 0.5.
    """

    steps: int = 24
    cfg_scale: float = 3.0
    cond_tread_rate: float | None = None
    uncond_tread_rate: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        for name in ("cond_tread_rate", "uncond_tread_rate"):
            rate = getattr(self, name)
            if rate is not None and not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {rate}")


def latent_size(height: int, width: int, *, patch_size: int = 2) -> tuple[int, int]:
    """Latent (h, w) of an image of height x width pixels; both must be multiples of 8 * patch_size."""
    step = LATENT_SCALE * patch_size
    if height <= 0 or width <= 0 or height % step or width % step:
        raise ValueError(f"height and width must be positive multiples of {step} px, got {height}x{width}")
    return height // LATENT_SCALE, width // LATENT_SCALE


@torch.no_grad()
def sample(model: nn.Module, cond: Tensor, *, height: int, width: int, uncond: Tensor | None = None,
           config: SamplerConfig = SamplerConfig(), camera: Camera | None = None,
           generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
    """Euler ODE from t = 1 to 0: normalised latents (B, C, h, w) for images of height x width pixels.

    cond (B, T, ctx_dim) text states; uncond (B or 1, T', ctx_dim) for the negative prompt, required when
    cfg_scale != 1. The same generator state gives the same latents (noise and routing both draw from it).
    """
    mc = model.config
    h, w = latent_size(height, width, patch_size=mc.patch_size)
    b = cond.shape[0]
    device = cond.device
    dtype = next(model.parameters()).dtype
    guided = config.cfg_scale != 1.0
    if guided:
        if uncond is None:
            raise ValueError("cfg_scale != 1 needs an unconditional context (uncond)")
        uncond = uncond.expand(b, -1, -1) if uncond.shape[0] == 1 else uncond

    if noise is None:
        noise = torch.randn((b, mc.in_channels, h, w), generator=generator,
                            device=generator.device if generator is not None else device)
    x = noise.to(device=device, dtype=torch.float32)
    pos_map = (camera or Camera()).pos_map(h, w, device=device).expand(b, -1, -1)
    aspect = torch.full((b,), math.log(width / height), device=device) if mc.aspect_embed else None

    def velocity(ctx: Tensor, t: Tensor, rate: float | None) -> Tensor:
        v = model(x.to(dtype), t, ctx.to(dtype), pos_map=pos_map, aspect=aspect, tread_rate=rate or None,
                  generator=generator)
        return v.float()

    was_training = model.training
    model.eval()
    try:
        for i in range(config.steps):
            t = torch.full((b,), 1.0 - i / config.steps, device=device)
            v = velocity(cond, t, config.cond_tread_rate)
            if guided:
                v_u = velocity(uncond, t, config.uncond_tread_rate)
                v = v_u + config.cfg_scale * (v - v_u)
            x = x - v / config.steps
    finally:
        model.train(was_training)
    return x
