"""Fixtures in the ORIGINAL's layouts, built from hdm_spec 2.8 and the original's module code, independently
of hdm_model.official's key table and of our exporter.

`spec_shapes(arch)` is the XUDiT state dict's {key: shape} from the spec formulas (checked against
src/xut/modules/*.py: attention qkv/out, SwiGLU w12/w3, AxialRoPE freqs (heads, dim_head/4, 2), RMSNorm
`*_pre_norm.norm`, PatchEmbed conv, UnPatch linear, TimestepEmbedding buffer (1, D/2), shared adaLN
LayerNorm -> Linear(D,4D) -> Mish -> Linear(4D,3D), addon Linear(1,D) -> Mish -> Linear(D,D)).
`XUDiTConditionModel` is a stand-in with the original wrapper's exact `register_to_config` arguments whose
`.model` holds tensors under those names, so diffusers' own save_pretrained / from_pretrained handle it.
"""

from __future__ import annotations

import math

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

TIME_TABLE = "time_emb.freqs"


def arch_of(config, ctx_size: int = 256) -> dict:
    """The original's `config/arch` JSON for one of our configs (field by field; `ctx_size` is not part of
    our model config: the text padding length of training)."""
    return {"patch_size": config.patch_size, "input_dim": config.in_channels, "dim": config.dim,
            "ctx_dim": config.ctx_dim, "ctx_size": ctx_size, "heads": config.heads,
            "dim_head": config.head_dim, "mlp_dim": config.mlp_dim, "depth": config.depth,
            "enc_blocks": config.enc_blocks, "dec_blocks": config.dec_blocks,
            "tread_config": {"prev_trns_depth": config.pre_blocks, "post_trns_depth": config.post_blocks,
                             "dropout_ratio": config.tread_rate},
            "addon_info_embs_dim": 1 if config.aspect_embed else None}


def _block(prefix: str, d: int, heads: int, dim_head: int, mlp: int, cross: bool) -> dict[str, tuple]:
    rope = (heads, dim_head // 4, 2)
    shapes = {"attn.qkv.weight": (3 * d, d), "attn.out.weight": (d, d), "attn.out.bias": (d,),
              "attn.rope.freqs": rope, "attn_pre_norm.norm.weight": (d,),
              "mlp.w12.weight": (2 * mlp, d), "mlp.w12.bias": (2 * mlp,), "mlp.w3.weight": (d, mlp),
              "mlp.w3.bias": (d,), "mlp_pre_norm.norm.weight": (d,)}
    if cross:
        shapes.update({"xattn.q.weight": (d, d), "xattn.kv.weight": (2 * d, d), "xattn.out.weight": (d, d),
                       "xattn.out.bias": (d,), "xattn.rope.freqs": rope, "xattn_pre_norm.norm.weight": (d,)})
    return {prefix + k: v for k, v in shapes.items()}


def spec_shapes(arch: dict) -> dict[str, tuple]:
    """XUDiT key -> shape for an arch (hdm_spec 2.8 layout); the time table is the only buffer."""
    d, c, p, mlp, ctx = arch["dim"], arch["input_dim"], arch["patch_size"], arch["mlp_dim"], arch["ctx_dim"]
    dim_head = arch["dim_head"]
    heads = d // dim_head
    shapes = {"in_patch.proj.weight": (d, c, p, p), "in_patch.proj.bias": (d,),
              "out_patch.proj.weight": (p * p * c, d), "out_patch.proj.bias": (p * p * c,),
              TIME_TABLE: (1, d // 2), "time_emb.proj.0.weight": (d, d), "time_emb.proj.0.bias": (d,),
              "ctx_proj.weight": (d, ctx), "ctx_proj.bias": (d,)}
    for kind in ("attn", "xattn", "ffw"):
        shapes.update({f"shared_adaln_{kind}.0.weight": (d,), f"shared_adaln_{kind}.0.bias": (d,),
                       f"shared_adaln_{kind}.1.weight": (4 * d, d), f"shared_adaln_{kind}.1.bias": (4 * d,),
                       f"shared_adaln_{kind}.3.weight": (3 * d, 4 * d), f"shared_adaln_{kind}.3.bias": (3 * d,)})
    if arch.get("addon_info_embs_dim"):
        shapes.update({"addon_info_embs_proj.0.weight": (d, 1), "addon_info_embs_proj.0.bias": (d,),
                       "addon_info_embs_proj.2.weight": (d, d), "addon_info_embs_proj.2.bias": (d,)})
    tread = arch["tread_config"]
    sites = [(f"prev_tread_trns.blocks.{k}.", False) for k in range(tread["prev_trns_depth"])]
    for i in range(arch["depth"]):
        sites += [(f"backbone.enc_blocks.{i}.{j}.", False) for j in range(arch["enc_blocks"])]
        sites += [(f"backbone.dec_blocks.{i}.{j}.", j == 0) for j in range(arch["dec_blocks"])]
    sites += [(f"post_tread_trns.blocks.{k}.", False) for k in range(tread["post_trns_depth"])]
    for prefix, cross in sites:
        shapes.update(_block(prefix, d, heads, dim_head, mlp, cross))
    return shapes


def spec_time_table(dim: int) -> torch.Tensor:
    """TimestepEmbedding.freqs: exp(-ln(1e4) k / (D/2)), fp32, shape (1, D/2)."""
    half = dim // 2
    return torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)[None]


def spec_state(arch: dict, *, seed: int = 0, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Random fp32 values under the spec's names and shapes (norm gains around 1), the real time table."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in spec_shapes(arch).items():
        value = torch.randn(shape, generator=gen) * scale
        if key.endswith("norm.weight") or key.endswith(".0.weight") and key.startswith("shared_adaln"):
            value = value + 1
        state[key] = value
    state[TIME_TABLE] = spec_time_table(arch["dim"])
    return state


def converter_file_state(xudit: dict[str, torch.Tensor], vae_state: dict[str, torch.Tensor], *,
                         vae_mean: list[float], vae_std: list[float]) -> dict[str, torch.Tensor]:
    """scripts/ckpt_converter.py's output: the FlowTrainer state dict (unet.model.*, vae.*, the vae_mean /
    vae_std buffers (1, C, 1, 1)) without te.*, every tensor .half()."""
    trainer = {f"unet.model.{k}": v for k, v in xudit.items()}
    trainer.update({f"vae.{k}": v for k, v in vae_state.items()})
    trainer["vae_std"] = torch.tensor(vae_std).view(1, -1, 1, 1)
    trainer["vae_mean"] = torch.tensor(vae_mean).view(1, -1, 1, 1)
    return {k: v.half().contiguous() for k, v in trainer.items()}


class SpecXUDiT(nn.Module):
    """Holds parameters (and the time-table buffer) under the spec's dotted names."""

    def __init__(self, arch: dict):
        super().__init__()
        for key, shape in spec_shapes(arch).items():
            *path, leaf = key.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            if key == TIME_TABLE:
                module.register_buffer(leaf, spec_time_table(arch["dim"]))
            else:
                module.register_parameter(leaf, nn.Parameter(torch.zeros(shape)))


class XUDiTConditionModel(ModelMixin, ConfigMixin):
    """Stand-in for src/hdm/modules/xut.py's wrapper: the same __init__ arguments and defaults."""

    @register_to_config
    def __init__(self, patch_size=2, input_dim=4, dim=1024, ctx_dim=1024, ctx_size=256, heads=16, dim_head=64,
                 mlp_dim=3072, depth=8, enc_blocks=1, dec_blocks=2, dec_ctx=False, class_cond=0, shared_adaln=True,
                 concat_ctx=True, use_dyt=False, double_t=False, addon_info_embs_dim=None, tread_config=None):
        super().__init__()
        self.model = SpecXUDiT({"patch_size": patch_size, "input_dim": input_dim, "dim": dim, "ctx_dim": ctx_dim,
                                "mlp_dim": mlp_dim, "dim_head": dim_head, "depth": depth, "enc_blocks": enc_blocks,
                                "dec_blocks": dec_blocks, "tread_config": tread_config,
                                "addon_info_embs_dim": addon_info_embs_dim})
