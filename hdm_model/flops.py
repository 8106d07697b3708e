"""Matmul FLOPs of one denoiser forward, from the config and token counts (for benchmarks and MFU)."""

from __future__ import annotations

from .config import XUTConfig
from .tread import kept_image_tokens


def block_flops(config: XUTConfig, n_tokens: int, *, cross: bool = False) -> int:
    """Forward FLOPs of one block on a sequence of n_tokens (2 per multiply-add; norms ignored)."""
    d, n = config.dim, n_tokens
    attn = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d  # qkv, scores + weighted sum, out
    mlp = 2 * n * d * 2 * config.mlp_dim + 2 * n * config.mlp_dim * d
    xattn = (2 * n * d * d + 2 * n * d * 2 * d + 2 * 2 * n * n * d + 2 * n * d * d) if cross else 0
    return attn + mlp + xattn


def denoiser_flops(config: XUTConfig, *, n_image: int, n_text: int, tread_rate: float = 0.0) -> int:
    """Forward FLOPs for one sample: blocks outside the U on all tokens, the U on the kept ones."""
    full = n_image + n_text
    routed = (kept_image_tokens(n_image, tread_rate) if tread_rate else n_image) + n_text
    outside = (config.pre_blocks + config.post_blocks) * block_flops(config, full)
    u_plain = config.depth * (config.enc_blocks + config.dec_blocks - 1) * block_flops(config, routed)
    u_cross = config.depth * block_flops(config, routed, cross=True)
    embed = 2 * n_image * config.dim * config.in_channels * config.patch_size**2 * 2  # patch + unpatch
    text = 2 * n_text * config.ctx_dim * config.dim
    return outside + u_plain + u_cross + embed + text
