"""Denoiser configuration: one frozen dataclass and the named presets (hdm_spec 2.1, 2.8)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Literal, get_args

AttnKernel = Literal["sdpa", "math"]
# Activation checkpointing policy (training with grad only), what backward recomputes instead of keeping:
#   none: nothing; outer: the pre and post blocks (they see every token, the routed backbone sees K of L);
#   mlp: the SwiGLU sub-layer of every block (its 2 * mlp_dim hidden is the largest activation of a block);
#   full: every block.
Checkpointing = Literal["none", "outer", "mlp", "full"]
RECOMPUTED: dict[str, frozenset[str]] = {  # policy -> the parts of the network it recomputes
    "none": frozenset(), "outer": frozenset({"outer"}), "mlp": frozenset({"mlp"}),
    "full": frozenset({"outer", "backbone"}),
}
# Fields that checkpoints written by earlier versions hold and nothing reads: ignored when loading.
# ctx_size (text padding length) belongs to the training stage's config (ctx_length), not the model's shape.
RETIRED_FIELDS = frozenset({"ctx_size"})


@dataclass(frozen=True)
class XUTConfig:
    """Shape and runtime switches of the XUT + TREAD denoiser.

    Field names follow this project; `from_official_arch` reads the original's `config/arch` JSON.
    """

    patch_size: int = 2
    in_channels: int = 4  # latent channels, in and out
    dim: int = 1024
    ctx_dim: int = 1024  # hidden size of the text encoder
    heads: int = 16
    head_dim: int = 64
    mlp_dim: int = 3072  # SwiGLU hidden width, used as given
    depth: int = 4  # U levels
    enc_blocks: int = 1  # plain blocks per encoder level
    dec_blocks: int = 3  # blocks per decoder level; the first one cross-attends to the encoder output
    pre_blocks: int = 1  # plain blocks before TREAD routing (original: prev_trns_depth)
    post_blocks: int = 3  # plain blocks after the merge (original: post_trns_depth)
    tread_rate: float = 0.5  # fraction of image tokens routed around the U backbone in training
    aspect_embed: bool = True  # aspect-ratio addon (original: addon_info_embs_dim = 1)
    attn_kernel: AttnKernel = "sdpa"  # "sdpa": torch scaled_dot_product_attention; "math": explicit softmax
    checkpointing: Checkpointing = "none"  # activation checkpointing policy (see Checkpointing)

    def __post_init__(self) -> None:
        for name in ("patch_size", "in_channels", "dim", "ctx_dim", "heads", "head_dim", "mlp_dim",
                     "depth", "enc_blocks", "dec_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"XUTConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("pre_blocks", "post_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"XUTConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.heads * self.head_dim != self.dim:
            raise ValueError(f"heads * head_dim must equal dim: {self.heads} * {self.head_dim} != {self.dim}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim must be a multiple of 4 for 2-D axial RoPE, got {self.head_dim}")
        if not 0.0 <= self.tread_rate < 1.0:
            raise ValueError(f"tread_rate must be in [0, 1), got {self.tread_rate}")
        if self.attn_kernel not in ("sdpa", "math"):
            raise ValueError(f"attn_kernel must be 'sdpa' or 'math', got {self.attn_kernel!r}")
        if self.checkpointing not in get_args(Checkpointing):
            raise ValueError(f"checkpointing must be one of {get_args(Checkpointing)}, got {self.checkpointing!r}")

    def replace(self, **overrides: Any) -> XUTConfig:
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> XUTConfig:
        """The config of `to_dict`'s dict; reads what earlier versions wrote (see RETIRED_FIELDS, the
        boolean `grad_checkpointing`: True -> checkpointing "full"; an explicit `checkpointing` wins)."""
        data = {k: v for k, v in data.items() if k not in RETIRED_FIELDS}
        if "grad_checkpointing" in data:
            legacy = data.pop("grad_checkpointing")
            data.setdefault("checkpointing", "full" if legacy else "none")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown XUTConfig fields: {unknown}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> XUTConfig:
        try:
            base = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
        return base.replace(**overrides)

    @classmethod
    def from_official_arch(cls, arch: dict[str, Any] | str | os.PathLike, **overrides: Any) -> XUTConfig:
        """Read the original's `config/arch/*.json` format (a dict or a JSON path)."""
        if not isinstance(arch, dict):
            with open(arch) as f:
                arch = json.load(f)
        known = {"patch_size", "input_dim", "dim", "ctx_dim", "ctx_size", "heads", "dim_head", "mlp_dim",
                 "depth", "enc_blocks", "dec_blocks", "tread_config", "addon_info_embs_dim",
                 # options of the original that must keep their HDM values
                 "dec_ctx", "class_cond", "shared_adaln", "concat_ctx", "use_dyt", "double_t"}
        unknown = sorted(set(arch) - known)
        if unknown:
            raise ValueError(f"unknown keys in official arch: {unknown}")
        required_values = {"dec_ctx": False, "class_cond": 0, "shared_adaln": True, "concat_ctx": True,
                           "use_dyt": False, "double_t": False}
        for key, value in required_values.items():
            if key in arch and arch[key] != value:
                raise ValueError(f"official arch option {key}={arch[key]!r} is not supported (HDM uses {value!r})")
        addon = arch.get("addon_info_embs_dim")
        if addon not in (None, 1):
            raise ValueError(f"addon_info_embs_dim must be 1 or absent, got {addon!r}")
        tread = arch.get("tread_config")
        if tread is None:
            raise ValueError("official arch without tread_config is not an HDM XUT model")
        heads, head_dim = arch.get("heads", 16), arch.get("dim_head", 64)
        dim = arch.get("dim", 1024)
        if heads * head_dim != dim:
            # The original derives the head count from dim // head_dim.
            heads = dim // head_dim
        return cls(
            patch_size=arch.get("patch_size", 2),
            in_channels=arch.get("input_dim", 4),
            dim=dim,
            ctx_dim=arch.get("ctx_dim", 1024),
            heads=heads,
            head_dim=head_dim,
            mlp_dim=arch.get("mlp_dim", 3072),
            depth=arch.get("depth", 8),
            enc_blocks=arch.get("enc_blocks", 1),
            dec_blocks=arch.get("dec_blocks", 2),
            pre_blocks=tread["prev_trns_depth"],
            post_blocks=tread["post_trns_depth"],
            tread_rate=tread["dropout_ratio"],
            aspect_embed=addon == 1,
        ).replace(**overrides)  # ctx_size: the original builds an all-zero context of it when given none


# The released HDM model (report: XUT-base, 343M), config/arch/xut-small-1024-tread.json.
OFFICIAL_XUT_BASE_ARCH: dict[str, Any] = {
    "patch_size": 2, "input_dim": 4, "dim": 1024, "ctx_dim": 1024, "ctx_size": 256, "heads": 16,
    "dim_head": 64, "mlp_dim": 3072, "depth": 4, "enc_blocks": 1, "dec_blocks": 3,
    "tread_config": {"prev_trns_depth": 1, "post_trns_depth": 3, "dropout_ratio": 0.5},
    "addon_info_embs_dim": 1,
}

PRESETS: dict[str, XUTConfig] = {
    # CPU tests and the demo: 2 U levels, every kind of block present, ~0.2M parameters.
    "tiny": XUTConfig(dim=64, ctx_dim=32, heads=4, head_dim=16, mlp_dim=128, depth=2, enc_blocks=1,
                      dec_blocks=2, pre_blocks=1, post_blocks=1),
    # Report sizes (same topology as the released model): 237,290,128 / 343,176,208 / 555,628,816.
    "xut-small": XUTConfig(dim=896, ctx_dim=640, heads=14, head_dim=64, mlp_dim=3072, dec_blocks=2),
    "xut-base": XUTConfig(),
    "xut-large": XUTConfig(dim=1280, ctx_dim=1152, heads=10, head_dim=128, mlp_dim=4096, dec_blocks=3),
}
