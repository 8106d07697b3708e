"""Import of released HDM weights (hdm_spec 2.8) through one explicit key table.

The released `.safetensors` holds the denoiser under `unet.model.` (the original XUDiT's names) and the
VAE under `vae.`; the text encoder is stripped. The tables below are the whole correspondence
between the original's names and ours: every official key is listed, with `{i}`, `{j}`, `{k}` standing
for level and block indices. A key that maps to None is derived (recomputed here and checked on load).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import Tensor

from .config import OFFICIAL_XUT_BASE_ARCH, XUTConfig
from .denoiser import XUTDenoiser
from .layers import timestep_freqs

DENOISER_PREFIX = "unet.model."
VAE_PREFIX = "vae."

# Blocks: where they live (official -> ours), then their tensors (official suffix -> our suffix).
_BLOCK_PREFIXES = {
    "prev_tread_trns.blocks.{k}.": "pre_blocks.{k}.",
    "backbone.enc_blocks.{i}.{j}.": "backbone.encoder.{i}.{j}.",
    "backbone.dec_blocks.{i}.{j}.": "backbone.decoder.{i}.{j}.",
    "post_tread_trns.blocks.{k}.": "post_blocks.{k}.",
}
_BLOCK_TENSORS = {
    "attn_pre_norm.norm.weight": "attn_norm.weight",
    "attn.qkv.weight": "attn.qkv.weight",
    "attn.out.weight": "attn.out.weight",
    "attn.out.bias": "attn.out.bias",
    "attn.rope.freqs": "attn.rope.log_freqs",
    "mlp_pre_norm.norm.weight": "mlp_norm.weight",
    "mlp.w12.weight": "mlp.w12.weight",
    "mlp.w12.bias": "mlp.w12.bias",
    "mlp.w3.weight": "mlp.w3.weight",
    "mlp.w3.bias": "mlp.w3.bias",
}
_CROSS_TENSORS = {  # only in the first block of each decoder level
    "xattn_pre_norm.norm.weight": "xattn_norm.weight",
    "xattn.q.weight": "xattn.q.weight",
    "xattn.kv.weight": "xattn.kv.weight",
    "xattn.out.weight": "xattn.out.weight",
    "xattn.out.bias": "xattn.out.bias",
    "xattn.rope.freqs": "xattn.rope.log_freqs",
}
_TOP_LEVEL = {
    "in_patch.proj.weight": "patch_embed.weight",
    "in_patch.proj.bias": "patch_embed.bias",
    "time_emb.freqs": None,  # (1, D/2) buffer: recomputed, checked on load
    "time_emb.proj.0.weight": "time_embed.proj.weight",
    "time_emb.proj.0.bias": "time_embed.proj.bias",
    **{f"shared_adaln_{theirs}.{n}.{kind}": f"modulation.{ours}.{n}.{kind}"
       for theirs, ours in (("attn", "attn"), ("xattn", "xattn"), ("ffw", "mlp"))
       for n in (0, 1, 3) for kind in ("weight", "bias")},
    "ctx_proj.weight": "ctx_proj.weight",
    "ctx_proj.bias": "ctx_proj.bias",
    "out_patch.proj.weight": "unpatch.weight",
    "out_patch.proj.bias": "unpatch.bias",
}
_ASPECT = {f"addon_info_embs_proj.{n}.{kind}": f"aspect_embed.{n}.{kind}" for n in (0, 2) for kind in ("weight", "bias")}

def official_key_map(config: XUTConfig) -> dict[str, str | None]:
    """The key table expanded for one config: official name (without `unet.model.`) -> our name."""
    mapping: dict[str, str | None] = dict(_TOP_LEVEL)
    if config.aspect_embed:
        mapping.update(_ASPECT)
    block_sites = [({"k": k}, "prev_tread_trns.blocks.{k}.", False) for k in range(config.pre_blocks)]
    block_sites += [({"i": i, "j": j}, "backbone.enc_blocks.{i}.{j}.", False)
                    for i in range(config.depth) for j in range(config.enc_blocks)]
    block_sites += [({"i": i, "j": j}, "backbone.dec_blocks.{i}.{j}.", j == 0)
                    for i in range(config.depth) for j in range(config.dec_blocks)]
    block_sites += [({"k": k}, "post_tread_trns.blocks.{k}.", False) for k in range(config.post_blocks)]
    for indices, theirs, cross in block_sites:
        ours = _BLOCK_PREFIXES[theirs].format(**indices)
        theirs = theirs.format(**indices)
        tensors = {**_BLOCK_TENSORS, **(_CROSS_TENSORS if cross else {})}
        mapping.update({theirs + t: ours + o for t, o in tensors.items()})
    return mapping


def _names(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def official_to_ours(state: Mapping[str, Tensor], config: XUTConfig) -> dict[str, Tensor]:
    """Rename an official denoiser state dict (with or without `unet.model.`; `vae.*` ignored) to ours.

    Missing or unexpected keys, wrong shapes and a wrong time-embedding buffer raise, naming the keys.
    """
    state = {k[len(DENOISER_PREFIX):] if k.startswith(DENOISER_PREFIX) else k: v
             for k, v in state.items() if not k.startswith(VAE_PREFIX)}
    mapping = official_key_map(config)
    missing = [k for k in mapping if k not in state]
    unexpected = [k for k in state if k not in mapping]
    if missing or unexpected:
        parts = [f"missing keys: {_names(missing)}" if missing else "",
                 f"unexpected keys: {_names(unexpected)}" if unexpected else ""]
        raise KeyError("official HDM weights do not match the arch: " + "; ".join(p for p in parts if p))
    freqs = state["time_emb.freqs"].float().reshape(-1)
    if not torch.allclose(freqs, timestep_freqs(config.dim), rtol=1e-5, atol=1e-7):
        raise ValueError("time_emb.freqs differs from exp(-ln(1e4) k / (D/2)): not an HDM time embedding")
    return {ours: state[theirs] for theirs, ours in mapping.items() if ours is not None}


def ours_to_official(model: XUTDenoiser, *, prefix: str = DENOISER_PREFIX) -> dict[str, Tensor]:
    """Our weights in the released layout (the inverse of the table), e.g. for the original's tools."""
    ours = model.state_dict()
    out = {}
    for theirs, name in official_key_map(model.config).items():
        if name is None:
            tensor = timestep_freqs(model.config.dim)[None]  # (1, D/2)
        else:
            tensor = ours[name]
        out[prefix + theirs] = tensor.detach().clone()
    return out


def load_official_hdm(weights: str | os.PathLike | Mapping[str, Tensor],
                      arch: dict[str, Any] | str | os.PathLike | None = None, *,
                      device: torch.device | str = "cpu", dtype: torch.dtype | None = torch.float32,
                      **config_overrides) -> XUTDenoiser:
    """Our denoiser with released HDM weights.

    weights: a released `.safetensors` path or a state dict in its layout. arch: a dict or JSON path in the
    original's `config/arch` format (default: the released xut-base arch). `config_overrides` set our
    runtime fields (e.g. grad_checkpointing=True). dtype None keeps the stored dtype.
    """
    if not isinstance(weights, Mapping):
        from safetensors.torch import load_file

        weights = load_file(os.fspath(weights))
    config = XUTConfig.from_official_arch(arch if arch is not None else OFFICIAL_XUT_BASE_ARCH, **config_overrides)
    state = official_to_ours(weights, config)
    with torch.device("meta"):
        model = XUTDenoiser(config)
    expected = model.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in state.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"official HDM weights have wrong shapes for the arch: {_names(wrong)}")
    state = {k: v.to(device=device, dtype=dtype if dtype is not None else v.dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    return model
