"""Building blocks of the XUT denoiser (hdm_spec 2.2-2.7).

Every block is modulated by ONE shared set of (scale, shift, gate) triples computed once per forward;
blocks own no modulation weights, only their RMSNorm gains. The residual of each sub-layer is added to the
normalised-and-modulated stream, as in the released code: x <- m + (1 + gate) * F(m), m = norm(x)(1+scale)+shift.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import RECOMPUTED, AttnKernel, XUTConfig

Triple = tuple[Tensor, Tensor, Tensor]  # (scale, shift, gate), each (B, 1, D)


@dataclass(frozen=True)
class BlockContext:
    """What every block of one forward pass shares."""

    pos: Tensor  # (B, N, 2) positions of the tokens in the stream (text tokens at (0, 0))
    attn: Triple  # modulation of the self-attention sub-layer
    xattn: Triple  # modulation of the cross-attention sub-layer
    mlp: Triple  # modulation of the feed-forward sub-layer
    n_text: int = 0  # trailing tokens of the stream at the origin (text), which RoPE leaves as they are

    def select(self, index: Tensor) -> BlockContext:
        """The context of a routed sub-sequence: positions gathered by `index` (B, K), which keeps the
        trailing text tokens last (tread.select_tokens)."""
        pos = self.pos.gather(1, index[..., None].expand(-1, -1, self.pos.shape[-1]))  # (B, K, 2)
        return dataclasses.replace(self, pos=pos)


def run_maybe_recomputed(module: nn.Module, *args, recompute: bool):
    """module(*args); when `recompute` and the module trains with grad enabled, its activations are dropped
    and recomputed in backward (the one place activation checkpointing is applied)."""
    if recompute and module.training and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


def timestep_freqs(dim: int, *, max_period: float = 10000.0, device=None) -> Tensor:
    """exp(-ln(max_period) * k / (D/2)), k = 0..D/2-1: (D/2,) float32."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=device) / half)


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of 1000*t, cos half first, then Linear + Mish. t (B,) -> (B, 1, D)."""

    def __init__(self, dim: int, *, time_factor: float = 1000.0):
        super().__init__()
        self.dim, self.time_factor = dim, time_factor
        self.proj = nn.Linear(dim, dim)

    def forward(self, t: Tensor) -> Tensor:
        freqs = timestep_freqs(self.dim, device=t.device)
        args = (self.time_factor * t.float().reshape(-1, 1, 1)) * freqs  # (B, 1, D/2)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 1, D)
        return F.mish(self.proj(emb.to(self.proj.weight.dtype)))


class SharedAdaLN(nn.Module):
    """The one set of three modulation MLPs (attention, cross-attention, feed-forward) used by all blocks."""

    def __init__(self, dim: int):
        super().__init__()
        self.attn, self.xattn, self.mlp = (self._mlp(dim) for _ in range(3))

    @staticmethod
    def _mlp(dim: int) -> nn.Sequential:
        mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Mish(), nn.Linear(4 * dim, 3 * dim))
        nn.init.zeros_(mlp[-1].weight)
        nn.init.zeros_(mlp[-1].bias)
        return mlp

    def forward(self, cond: Tensor, pos: Tensor, *, n_text: int = 0) -> BlockContext:
        def triple(mlp: nn.Sequential) -> Triple:
            scale, shift, gate = mlp(cond).chunk(3, dim=-1)  # chunk order: scale, shift, gate
            return scale, shift, gate

        return BlockContext(pos=pos, attn=triple(self.attn), xattn=triple(self.xattn), mlp=triple(self.mlp),
                            n_text=n_text)


class AxialRoPE(nn.Module):
    """2-D axial rotary embedding with learnable per-head log-frequencies (heads, head_dim/4, 2).

    All frequencies start at pi. Channel pairs (2m, 2m+1) are interleaved; pair m rotates with y when m
    is even and with x when m is odd, so the whole head dimension is rotated.
    """

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.log_freqs = nn.Parameter(torch.full((heads, head_dim // 4, 2), math.log(math.pi)))

    def rotation(self, pos: Tensor, *, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(cos, sin), each (B, H, N, hd/2) in `dtype`, of the angles at pos (B, N, 2); computed in fp32."""
        angles = pos.float()[:, :, None, None, :] * self.log_freqs.float().exp()  # (B, N, H, hd/4, 2)
        angles = angles.flatten(-2).transpose(1, 2)  # (B, H, N, hd/2): [y0, x0, y1, x1, ...]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, x: Tensor, pos: Tensor, *, n_text: int = 0) -> Tensor:
        """x (B, H, N, hd), pos (B, N, 2) -> x with its first N - n_text tokens rotated."""
        return rotate(x, *self.rotation(pos[:, :pos.shape[1] - n_text], dtype=x.dtype))


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, N, hd) with its first L tokens rotated by (cos, sin) (B, H, L, hd/2); the N - L trailing
    tokens (text, at the origin: the identity rotation) are passed through untouched, not multiplied by 1."""
    n = cos.shape[2]
    x0, x1 = x[:, :, :n].unflatten(-1, (-1, 2)).unbind(-1)  # each (B, H, L, hd/2)
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)  # (B, H, L, hd)
    return rotated if n == x.shape[2] else torch.cat([rotated, x[:, :, n:]], dim=2)


def attention(q: Tensor, k: Tensor, v: Tensor, *, kernel: AttnKernel) -> Tensor:
    """Bidirectional attention without mask. q (B, H, N, hd), k/v (B, H, M, hd) -> (B, H, N, hd)."""
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    weights = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, N, M)
    return weights.softmax(dim=-1) @ v


class Attention(nn.Module):
    """Self-attention (qkv from x) or cross-attention (q from x, kv from a source); RoPE on q and k.

    Cross-attention here always reads a sequence laid out like x (the final encoder output), so both
    sides use the same positions and the same rotation, computed once per call.
    """

    def __init__(self, config: XUTConfig, *, cross: bool):
        super().__init__()
        dim = config.dim
        self.heads, self.kernel = config.heads, config.attn_kernel
        if cross:
            self.q = nn.Linear(dim, dim, bias=False)
            self.kv = nn.Linear(dim, 2 * dim, bias=False)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim)
        self.rope = AxialRoPE(config.heads, config.head_dim)

    def forward(self, x: Tensor, pos: Tensor, source: Tensor | None = None, *, n_text: int = 0) -> Tensor:
        """x (B, N, D), pos (B, N, 2), source (B, N, D) or None -> (B, N, D); the n_text trailing tokens
        (at the origin) are not rotated."""
        if source is None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q = self.q(x)
            k, v = self.kv(source).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, N, hd)
        cos, sin = self.rope.rotation(pos[:, :pos.shape[1] - n_text], dtype=q.dtype)
        out = attention(rotate(q, cos, sin), rotate(k, cos, sin), v, kernel=self.kernel)
        return self.out(out.transpose(1, 2).flatten(2))  # (B, N, D)


class SwiGLU(nn.Module):
    """w3(SiLU(u) * v) with (u, v) = split(w12(x)); hidden width used as given."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        u, v = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(u) * v)


def modulate(norm: nn.RMSNorm, x: Tensor, triple: Triple) -> tuple[Tensor, Tensor]:
    """(m, g): m = RMSNorm(x) * (1 + scale) + shift, g = 1 + gate."""
    scale, shift, gate = triple
    return norm(x) * (1 + scale) + shift, 1 + gate


class Block(nn.Module):
    """Transformer block: self-attention, optional cross-attention to a source sequence, SwiGLU.

    With the "mlp" checkpointing policy the SwiGLU sub-layer is recomputed in backward. That checkpoint
    lives inside the block, so a compiled block traces it as one graph (torch.compile's partitioner then
    recomputes the feed-forward hidden in the backward graph) instead of breaking the graph there.
    """

    def __init__(self, config: XUTConfig, *, cross: bool = False):
        super().__init__()
        dim = config.dim
        self.attn_norm = nn.RMSNorm(dim, eps=1e-6)
        self.attn = Attention(config, cross=False)
        self.xattn_norm = nn.RMSNorm(dim, eps=1e-6) if cross else None
        self.xattn = Attention(config, cross=True) if cross else None
        self.mlp_norm = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, config.mlp_dim)
        self.recompute_mlp = "mlp" in RECOMPUTED[config.checkpointing]

    def forward(self, x: Tensor, block_ctx: BlockContext, source: Tensor | None = None) -> Tensor:
        m, g = modulate(self.attn_norm, x, block_ctx.attn)
        x = m + g * self.attn(m, block_ctx.pos, n_text=block_ctx.n_text)
        if self.xattn is not None:
            if source is None:
                raise ValueError("a block with cross-attention needs a source sequence")
            m, g = modulate(self.xattn_norm, x, block_ctx.xattn)
            x = m + g * self.xattn(m, block_ctx.pos, source, n_text=block_ctx.n_text)
        m, g = modulate(self.mlp_norm, x, block_ctx.mlp)
        return m + g * run_maybe_recomputed(self.mlp, m, recompute=self.recompute_mlp)
