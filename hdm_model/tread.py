"""TREAD token routing (hdm_spec 3): a random subset of image tokens skips the whole U backbone.

Per sample, K = L - floor(L * rate) of the L image tokens are kept, in raster order, followed by every
text token. The routed tokens pass the backbone unchanged and are merged back at their own positions.
Routing works on index tensors (gather / scatter), so it needs no host synchronisation, and K depends only on
L and the rate, so every shape is fixed per resolution (what a compiled graph with static shapes needs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def kept_image_tokens(n_image: int, rate: float) -> int:
    """K = L - floor(L * rate): image tokens that go through the backbone."""
    return n_image - math.floor(n_image * rate)


def select_tokens(batch: int, n_image: int, n_text: int, rate: float, *, device: torch.device,
                  generator: torch.Generator | None = None) -> Tensor:
    """Indices (B, K + T) of the tokens kept: K random image tokens in raster order, then all text tokens."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"TREAD rate must be in (0, 1), got {rate}")
    keep = kept_image_tokens(n_image, rate)
    rand_device = generator.device if generator is not None else device
    scores = torch.rand(batch, n_image, generator=generator, device=rand_device).to(device)
    image_idx = scores.argsort(dim=1)[:, :keep].sort(dim=1).values  # (B, K), raster order
    text_idx = torch.arange(n_image, n_image + n_text, device=device).expand(batch, -1)  # (B, T)
    return torch.cat([image_idx, text_idx], dim=1)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x (B, N, D), index (B, K) -> (B, K, D)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def scatter_tokens(x: Tensor, index: Tensor, kept: Tensor) -> Tensor:
    """Copy of x (B, N, D) with the rows at `index` (B, K) replaced by `kept` (B, K, D)."""
    return x.scatter(1, index[..., None].expand(-1, -1, x.shape[-1]), kept)
