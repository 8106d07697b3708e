"""The XUT + TREAD denoiser (hdm_spec 2, 3): predicts the flow-matching velocity of a latent.

    x_t (B, C, h, w) --patch--> image tokens (B, L, D) ++ projected text (B, T, D)
      -> pre blocks -> [TREAD: keep K of L image tokens] -> XUT backbone -> [merge] -> post blocks
      -> first L tokens --unpatch--> velocity (B, C, h, w)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from . import tread
from .config import RECOMPUTED, XUTConfig
from .layers import Block, BlockContext, SharedAdaLN, TimestepEmbedding, run_maybe_recomputed
from .positions import make_axial_pos, resize_pos_map


class XUTBackbone(nn.Module):
    """Cross-U-transformer: `depth` encoder levels, then `depth` decoder levels whose first block
    cross-attends to the FINAL encoder output (text tokens included), as the released code does."""

    def __init__(self, config: XUTConfig):
        super().__init__()
        self.encoder = nn.ModuleList(
            nn.ModuleList(Block(config) for _ in range(config.enc_blocks)) for _ in range(config.depth))
        self.decoder = nn.ModuleList(
            nn.ModuleList(Block(config, cross=j == 0) for j in range(config.dec_blocks))
            for _ in range(config.depth))


class XUTDenoiser(nn.Module):
    """XUDiT of the released HDM: `model(x_t, t, ctx, *, pos_map, aspect, tread_rate)` -> velocity."""

    def __init__(self, config: XUTConfig):
        super().__init__()
        self.config = config
        d, p = config.dim, config.patch_size
        self.patch_embed = nn.Conv2d(config.in_channels, d, kernel_size=p, stride=p)
        self.time_embed = TimestepEmbedding(d)
        self.aspect_embed = None
        if config.aspect_embed:
            self.aspect_embed = nn.Sequential(nn.Linear(1, d), nn.Mish(), nn.Linear(d, d))
            nn.init.zeros_(self.aspect_embed[-1].weight)
            nn.init.zeros_(self.aspect_embed[-1].bias)
        self.modulation = SharedAdaLN(d)
        self.ctx_proj = nn.Linear(config.ctx_dim, d)
        self.pre_blocks = nn.ModuleList(Block(config) for _ in range(config.pre_blocks))
        self.backbone = XUTBackbone(config)
        self.post_blocks = nn.ModuleList(Block(config) for _ in range(config.post_blocks))
        self.unpatch = nn.Linear(d, p * p * config.in_channels)
        nn.init.normal_(self.unpatch.weight, std=1.0 / d**2)  # 1/D^2 as released (not 1/sqrt(D))

    # -- forward -------------------------------------------------------------------------------------

    def forward(self, x_t: Tensor, t: Tensor, ctx: Tensor, *, pos_map: Tensor | None = None,
                aspect: Tensor | None = None, tread_rate: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """x_t (B, C, h, w); t (B,) in [0, 1], 1 = noise; ctx (B, T, ctx_dim); pos_map (B, h*w, 2) at latent
        resolution or None for the whole-image grid; aspect (B,) = log(W/H) or None.

        TREAD: in training mode `tread_rate` (default: the config's) of the image tokens skip the backbone;
        in eval mode only when a rate is given. A rate of 0 or None means no routing.
        `generator` drives the routing draw (for reproducible sampling).
        """
        b, _, h, w = x_t.shape
        p = self.config.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not a multiple of the patch size {p}")
        rate = self.routing_rate(tread_rate)
        keep = None
        if rate:  # drawn here, outside what compile "full" compiles: a generator would break its graph
            keep = tread.select_tokens(b, (h // p) * (w // p), ctx.shape[1], rate, device=x_t.device,
                                       generator=generator)
        return self.forward_core(x_t, t, ctx, pos_map=pos_map, aspect=aspect, keep=keep)

    def forward_core(self, x_t: Tensor, t: Tensor, ctx: Tensor, *, pos_map: Tensor | None, aspect: Tensor | None,
                     keep: Tensor | None) -> Tensor:
        """`forward` once the routing is drawn: `keep` (B, K + T) indexes the tokens the backbone sees
        (tread.select_tokens), None routes nothing. Static shapes, no host sync: compile "full" compiles it."""
        b, _, h, w = x_t.shape
        gh, gw = h // self.config.patch_size, w // self.config.patch_size
        x = self.patch_embed(x_t).flatten(2).transpose(1, 2)  # (B, L, D), raster order
        n_image, n_text = gh * gw, ctx.shape[1]
        pos = self._image_positions(pos_map, b, h, w, x.device)  # (B, L, 2)
        pos = torch.cat([pos, pos.new_zeros(b, n_text, 2)], dim=1)  # text tokens at (0, 0)
        x = torch.cat([x, self.ctx_proj(ctx)], dim=1)  # (B, L + T, D): [image; text]
        block_ctx = self.modulation(self._condition(t, aspect), pos, n_text=n_text)

        x = self._run(self.pre_blocks, x, block_ctx, part="outer")
        if keep is not None:
            kept = self._backbone(tread.gather_tokens(x, keep), block_ctx.select(keep))
            x = tread.scatter_tokens(x, keep, kept)  # routed tokens pass through unchanged
        else:
            x = self._backbone(x, block_ctx)
        x = self._run(self.post_blocks, x, block_ctx, part="outer")
        return self._unpatch(x[:, :n_image], gh, gw)

    def routing_rate(self, tread_rate: float | None) -> float:
        """Fraction of image tokens routed around the backbone for this call (0.0 = none)."""
        rate = tread_rate if tread_rate is not None else (self.config.tread_rate if self.training else 0.0)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"tread_rate must be in [0, 1), got {rate}")
        return rate

    def _image_positions(self, pos_map: Tensor | None, b: int, h: int, w: int, device) -> Tensor:
        p = self.config.patch_size
        if pos_map is None:
            return make_axial_pos(h // p, w // p, device=device).expand(b, -1, -1)
        if pos_map.shape != (b, h * w, 2):
            raise ValueError(f"pos_map must have shape {(b, h * w, 2)} (latent resolution), got {tuple(pos_map.shape)}")
        return resize_pos_map(pos_map.float(), src_hw=(h, w), dst_hw=(h // p, w // p))

    def _condition(self, t: Tensor, aspect: Tensor | None) -> Tensor:
        cond = self.time_embed(t)  # (B, 1, D)
        if aspect is not None:
            if self.aspect_embed is None:
                raise ValueError("this model has no aspect-ratio embedding (config.aspect_embed=False)")
            cond = cond + self.aspect_embed(aspect.reshape(-1, 1).to(cond.dtype))[:, None]  # (B, 1, D)
        return cond

    def _backbone(self, x: Tensor, block_ctx: BlockContext) -> Tensor:
        for level in self.backbone.encoder:
            x = self._run(level, x, block_ctx, part="backbone")
        encoder_out = x
        for level in self.backbone.decoder:
            x = self._run(level[:1], x, block_ctx, source=encoder_out, part="backbone")
            x = self._run(level[1:], x, block_ctx, part="backbone")
        return x

    def _run(self, blocks: nn.ModuleList, x: Tensor, block_ctx: BlockContext, source: Tensor | None = None, *,
             part: str) -> Tensor:
        """Apply blocks in order; whole blocks are recomputed in backward when the checkpointing policy
        names their `part` ("outer": pre and post blocks, "backbone": the U)."""
        recompute = part in RECOMPUTED[self.config.checkpointing]
        for block in blocks:
            x = run_maybe_recomputed(block, x, block_ctx, source, recompute=recompute)
        return x

    def _unpatch(self, x: Tensor, gh: int, gw: int) -> Tensor:
        p, c = self.config.patch_size, self.config.in_channels
        x = self.unpatch(x).reshape(x.shape[0], gh, gw, p, p, c)  # per token: (p_row, p_col, channel)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], c, gh * p, gw * p)  # (B, C, h, w)

    # -- persistence ---------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the weights and config.json: a checkpoint directory (hdm_model.checkpoint) without the text
        encoder, VAE and training state a training stage adds."""
        from . import checkpoint

        return checkpoint.save(directory, weights=self.state_dict(), meta=checkpoint.CheckpointMeta(model=self.config))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device: torch.device | str = "cpu", ema: bool = False,
                        **overrides) -> XUTDenoiser:
        """Load a checkpoint directory (`save_pretrained`'s or a training stage's); with `ema`, its EMA weights
        where it has them. `overrides` replace config fields that do not change the weights (e.g. tread_rate)."""
        from . import checkpoint

        config = checkpoint.read_meta(directory).model.replace(**overrides)
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(checkpoint.load_weights(directory, ema=ema, device=device), assign=True)
        return model


def build_denoiser(config: str | XUTConfig = "xut-base", **overrides) -> XUTDenoiser:
    """A freshly initialised denoiser from a preset name or a config; `overrides` replace config fields."""
    if isinstance(config, str):
        config = XUTConfig.preset(config, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    return XUTDenoiser(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
