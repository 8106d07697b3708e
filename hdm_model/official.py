"""Import of released HDM weights (hdm_spec 2.8, hdm_formats 1-2) through one explicit key table.

Two layouts are read, both owned here (names, prefixes, file names):

- the single file (`hdm-xut-340M-*.safetensors`): the original's converter saves its trainer's whole state
  dict minus the text encoder, every tensor fp16: the denoiser under `unet.model.` (the original XUDiT's
  names), the VAE under `vae.` and the trainer buffers of `TRAINER_BUFFERS`;
- the diffusers folder (`HDMXUTPipeline.save_pretrained`): `transformer/` (config.json = the
  XUDiTConditionModel arguments, weights `model.<XUDiT key>`), `vae/`, `text_encoder/`, `tokenizer/`.

The tables below are the whole correspondence between the original's names and ours: every official key
is listed, with `{i}`, `{j}`, `{k}` standing for level and block indices. A key that maps to None is
derived (recomputed here and checked on load). Pickled files (`.ckpt`, `.pt`, ...) are refused, never
unpickled. hdm_model/release.py writes both layouts from these same names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from .checkpoint import list_names
from .config import OFFICIAL_XUT_BASE_ARCH, XUTConfig
from .denoiser import XUTDenoiser
from .layers import timestep_freqs

# -- the single file ------------------------------------------------------------------------------------
DENOISER_PREFIX = "unet.model."
COMPILED_DENOISER_PREFIX = "unet._orig_mod.model."  # a torch.compile'd unet (trainer unet_compile=True)
VAE_PREFIX = "vae."
LYCORIS_PREFIX = "lycoris_model."  # a LyCORIS fine-tune's adapter: refused, it is not a plain denoiser
# Keys of the original trainer's state dict outside the denoiser and the VAE: what each is, what we do.
TRAINER_BUFFERS = {
    "vae_mean": "FlowTrainer buffer (1, C, 1, 1): the VAE config's latents_mean at training time; "
                "HDMPipeline.from_official normalises latents with it",
    "vae_std": "FlowTrainer buffer (1, C, 1, 1): the VAE config's latents_std at training time; "
               "HDMPipeline.from_official normalises latents with it",
}

# -- the diffusers folder ---------------------------------------------------------------------------------
MODEL_INDEX = "model_index.json"
PIPELINE_CLASS = "HDMXUTPipeline"
TRANSFORMER_CLASS = ("hdm.modules.xut", "XUDiTConditionModel")  # its [library, class] in model_index.json
TRANSFORMER_DIR, VAE_DIR, TEXT_ENCODER_DIR, TOKENIZER_DIR, SCHEDULER_DIR = (
    "transformer", "vae", "text_encoder", "tokenizer", "scheduler")
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_WEIGHTS_INDEX = DIFFUSERS_WEIGHTS + ".index.json"  # sharded weights
TRANSFORMER_PREFIX = "model."  # XUDiTConditionModel keeps the XUDiT as `.model`
# XUDiTConditionModel.__init__'s register_to_config arguments (src/hdm/modules/xut.py), in its order.
TRANSFORMER_ARGS = ("patch_size", "input_dim", "dim", "ctx_dim", "ctx_size", "heads", "dim_head", "mlp_dim",
                    "depth", "enc_blocks", "dec_blocks", "dec_ctx", "class_cond", "shared_adaln", "concat_ctx",
                    "use_dyt", "double_t", "addon_info_embs_dim", "tread_config")

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_ZIP_MAGIC, _PICKLE_PROTOCOL = b"PK\x03\x04", b"\x80"  # torch.save's zip container; a raw pickle

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
TIME_TABLE = "time_emb.freqs"  # (1, D/2) buffer: recomputed, checked on load
_TOP_LEVEL = {
    "in_patch.proj.weight": "patch_embed.weight",
    "in_patch.proj.bias": "patch_embed.bias",
    TIME_TABLE: None,
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


def official_arch(config: XUTConfig, *, ctx_size: int = 256) -> dict[str, Any]:
    """The XUDiTConditionModel arguments (= the original's `config/arch` JSON) of a config; the inverse of
    `XUTConfig.from_official_arch` on the shape fields. `ctx_size`: text tokens per sample, which the
    original reads only to build an all-zero context when it is given none."""
    values = {"patch_size": config.patch_size, "input_dim": config.in_channels, "dim": config.dim,
              "ctx_dim": config.ctx_dim, "ctx_size": ctx_size, "heads": config.heads,
              "dim_head": config.head_dim, "mlp_dim": config.mlp_dim, "depth": config.depth,
              "enc_blocks": config.enc_blocks, "dec_blocks": config.dec_blocks, "dec_ctx": False, "class_cond": 0,
              "shared_adaln": True, "concat_ctx": True, "use_dyt": False, "double_t": False,
              "addon_info_embs_dim": 1 if config.aspect_embed else None,
              "tread_config": {"dropout_ratio": config.tread_rate, "prev_trns_depth": config.pre_blocks,
                               "post_trns_depth": config.post_blocks}}
    return {name: values[name] for name in TRANSFORMER_ARGS}


# ---------------------------------------------------------------------------------------------------
# Reading either layout

@dataclass
class OfficialWeights:
    """What a released file or folder holds, split by role (see `read_official`)."""

    denoiser: dict[str, Tensor]  # XUDiT names, no prefix
    source: str
    arch: dict[str, Any] | None = None  # the folder's transformer/config.json arguments; None for a file
    vae: dict[str, Tensor] = field(default_factory=dict)  # the file's AutoencoderKL weights (names after `vae.`)
    latent_mean: Tensor | None = None  # (C,) the file's vae_mean buffer
    latent_std: Tensor | None = None  # (C,) the file's vae_std buffer
    folder: Path | None = None  # the diffusers folder (its vae/, text_encoder/, tokenizer/)

    def component(self, name: str) -> Path | None:
        """A subfolder of the diffusers folder (e.g. VAE_DIR), None when absent or for a single file."""
        path = self.folder / name if self.folder is not None else None
        return path if path is not None and path.is_dir() else None


def read_official(source: str | os.PathLike | Mapping[str, Tensor]) -> OfficialWeights:
    """Either released layout: a single `.safetensors` file (or its state dict), or a diffusers folder given
    as the folder or its `transformer/` subfolder. Pickled files are refused without being opened as pickles."""
    if isinstance(source, Mapping):
        return split_release_state(source, source="the state dict")
    path = Path(source)
    if path.is_dir():
        return read_diffusers_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"no released HDM weights at {path}")
    from safetensors.torch import load_file

    require_safetensors(path)
    return split_release_state(load_file(os.fspath(path)), source=str(path))


def split_release_state(state: Mapping[str, Tensor], *, source: str) -> OfficialWeights:
    """Sort the single file's keys by role: `unet.model.` (or `unet._orig_mod.model.`) -> denoiser, `vae.` ->
    VAE, TRAINER_BUFFERS by name; `lycoris_model.*` is refused. Any other key is kept in the denoiser state
    under its full name (so bare XUDiT names load, and a stray key is named as unexpected)."""
    lycoris = [k for k in state if k.startswith(LYCORIS_PREFIX)]
    if lycoris:
        raise ValueError(f"{source} holds a LyCORIS fine-tune ({len(lycoris)} '{LYCORIS_PREFIX}*' tensors, e.g. "
                         f"{lycoris[0]}), not a plain denoiser: merge the adapter into the base weights with "
                         "LyCORIS first, then load the merged file")
    out = OfficialWeights(denoiser={}, source=source)
    for key, tensor in state.items():
        if key in TRAINER_BUFFERS:
            setattr(out, "latent_mean" if key == "vae_mean" else "latent_std", tensor.float().reshape(-1))
        elif key.startswith(VAE_PREFIX):
            out.vae[key[len(VAE_PREFIX):]] = tensor
        else:
            name = key
            for prefix in (DENOISER_PREFIX, COMPILED_DENOISER_PREFIX):
                name = name[len(prefix):] if name.startswith(prefix) else name
            if name in out.denoiser:
                raise ValueError(f"{source} holds the denoiser tensor {name} twice (e.g. under both "
                                 f"'{DENOISER_PREFIX}' and '{COMPILED_DENOISER_PREFIX}')")
            out.denoiser[name] = tensor
    return out


def read_diffusers_folder(path: Path) -> OfficialWeights:
    """HDMXUTPipeline's folder (or its transformer/ subfolder): arch from transformer/config.json, weights
    from transformer/diffusion_pytorch_model.safetensors (one file or shards)."""
    transformer = path / TRANSFORMER_DIR if (path / TRANSFORMER_DIR).is_dir() else path
    if not (transformer / DIFFUSERS_CONFIG).is_file() or "model" in _read_json(transformer / DIFFUSERS_CONFIG):
        raise ValueError(f"{path} is a directory but not HDM's diffusers folder (no {TRANSFORMER_DIR}/"
                         f"{DIFFUSERS_CONFIG}); a training checkpoint directory loads with from_checkpoint")
    arch = {k: v for k, v in _read_json(transformer / DIFFUSERS_CONFIG).items() if not k.startswith("_")}
    state = _read_diffusers_weights(transformer)
    denoiser = {k[len(TRANSFORMER_PREFIX):] if k.startswith(TRANSFORMER_PREFIX) else k: v for k, v in state.items()}
    in_pipeline = transformer != path or (path.parent / MODEL_INDEX).is_file()
    return OfficialWeights(denoiser=denoiser, source=str(path), arch=arch,
                           folder=transformer.parent if in_pipeline else None)


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def _read_diffusers_weights(transformer: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if (transformer / DIFFUSERS_WEIGHTS).is_file():
        files = [transformer / DIFFUSERS_WEIGHTS]
    elif (transformer / DIFFUSERS_WEIGHTS_INDEX).is_file():
        files = [transformer / name for name in
                 sorted(set(_read_json(transformer / DIFFUSERS_WEIGHTS_INDEX)["weight_map"].values()))]
    else:
        pickled = [p.name for p in transformer.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickled:
            raise ValueError(_pickle_refusal(transformer / pickled[0]))
        raise FileNotFoundError(f"{transformer} has no {DIFFUSERS_WEIGHTS}")
    state: dict[str, Tensor] = {}
    for file in files:
        require_safetensors(file)
        state.update(load_file(os.fspath(file)))
    return state


def require_safetensors(path: Path) -> None:
    """Refuse a file that is not safetensors, by its name and first bytes only: a pickle (torch.save, a
    Lightning `.ckpt`) runs code when loaded, so it is never opened with torch.load here."""
    with open(path, "rb") as f:
        head = f.read(9)
    if path.suffix.lower() in PICKLE_SUFFIXES or head.startswith((_ZIP_MAGIC, _PICKLE_PROTOCOL)):
        raise ValueError(_pickle_refusal(path))
    header_len = int.from_bytes(head[:8], "little")
    if len(head) < 9 or head[8:9] != b"{" or 8 + header_len > path.stat().st_size:
        raise ValueError(f"{path} is not a safetensors file")


def _pickle_refusal(path: Path) -> str:
    return (f"{path} is a pickled checkpoint; it is not loaded, since unpickling runs arbitrary code. On a "
            "machine you trust, convert it to safetensors: the original HDM's scripts/ckpt_converter.py for a "
            "training .ckpt, or torch.load it and safetensors.torch.save_file its state dict (minus 'te.*')")


# ---------------------------------------------------------------------------------------------------
# Renaming

def check_time_table(freqs: Tensor, dim: int) -> None:
    """The stored time-embedding table must be exp(-ln(1e4) k / (D/2)) up to the rounding of its storage:
    the released file is fp16, so the tolerance is one fp16 eps (twice the worst rounding), relative; a
    table of another formula (period, scale) is off by far more and refused."""
    stored = freqs.dtype if freqs.dtype.is_floating_point else torch.float32
    rtol = max(torch.finfo(stored).eps, torch.finfo(torch.float16).eps)  # an fp16 table, possibly cast up
    expected = timestep_freqs(dim)
    if freqs.numel() != expected.numel() or not torch.allclose(freqs.float().reshape(-1), expected, rtol=rtol, atol=0):
        raise ValueError(f"{TIME_TABLE} differs from exp(-ln(1e4) k / (D/2)) beyond {stored} rounding: "
                         "not an HDM time embedding")


def official_to_ours(state: Mapping[str, Tensor] | OfficialWeights, config: XUTConfig) -> dict[str, Tensor]:
    """Rename an official denoiser state dict (the single file's, with or without `unet.model.`; `vae.*` and
    TRAINER_BUFFERS set aside) to ours. Missing or unexpected keys and a wrong time table raise, naming them."""
    if not isinstance(state, OfficialWeights):
        state = split_release_state(state, source="the state dict")
    denoiser = state.denoiser
    mapping = official_key_map(config)
    missing = [k for k in mapping if k not in denoiser]
    unexpected = [k for k in denoiser if k not in mapping]
    if missing or unexpected:
        parts = [f"missing keys: {list_names(missing)}" if missing else "",
                 f"unexpected keys: {list_names(unexpected)}" if unexpected else ""]
        raise KeyError("official HDM weights do not match the arch: " + "; ".join(p for p in parts if p))
    check_time_table(denoiser[TIME_TABLE], config.dim)
    return {ours: denoiser[theirs] for theirs, ours in mapping.items() if ours is not None}


def ours_to_official(model: XUTDenoiser, *, prefix: str = DENOISER_PREFIX) -> dict[str, Tensor]:
    """Our weights in the released layout (the inverse of the table), fp32 time table included."""
    ours = model.state_dict()
    out = {}
    for theirs, name in official_key_map(model.config).items():
        if name is None:
            tensor = timestep_freqs(model.config.dim)[None]  # (1, D/2)
        else:
            tensor = ours[name]
        out[prefix + theirs] = tensor.detach().clone()
    return out


# ---------------------------------------------------------------------------------------------------
# Loading

def official_config(weights: OfficialWeights, arch: dict[str, Any] | str | os.PathLike | None = None,
                    **config_overrides) -> XUTConfig:
    """Our config for released weights: `arch` when given, else the folder's transformer/config.json, else
    the released xut-base arch."""
    arch = arch if arch is not None else weights.arch if weights.arch is not None else OFFICIAL_XUT_BASE_ARCH
    return XUTConfig.from_official_arch(arch, **config_overrides)


def denoiser_state_from_release(source: str | os.PathLike | Mapping[str, Tensor] | OfficialWeights,
                                config: XUTConfig) -> dict[str, Tensor]:
    """Released weights (either layout) as OUR state dict for `config`, names and shapes checked; stored
    dtype kept. For starting a training stage from the release (`--init-from`)."""
    weights = source if isinstance(source, OfficialWeights) else read_official(source)
    state = official_to_ours(weights, config)
    with torch.device("meta"):
        expected = XUTDenoiser(config).state_dict()
    wrong = [f"{k}: {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in state.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"official HDM weights of {weights.source} have wrong shapes for the arch: {list_names(wrong)}")
    return state


def load_official_hdm(weights: str | os.PathLike | Mapping[str, Tensor] | OfficialWeights,
                      arch: dict[str, Any] | str | os.PathLike | None = None, *,
                      device: torch.device | str = "cpu", dtype: torch.dtype | None = torch.float32,
                      **config_overrides) -> XUTDenoiser:
    """Our denoiser with released HDM weights.

    weights: a released `.safetensors` path (fp16 as released, or any float dtype), its state dict, a
    diffusers folder (or its transformer/), or what `read_official` returned. arch: a dict or JSON path in
    the original's `config/arch` format (default: the folder's transformer/config.json, else the released
    xut-base arch). `config_overrides` set our runtime fields (e.g. checkpointing="full"). dtype None
    keeps the stored dtype.
    """
    weights = weights if isinstance(weights, OfficialWeights) else read_official(weights)
    config = official_config(weights, arch, **config_overrides)
    state = denoiser_state_from_release(weights, config)
    with torch.device("meta"):
        model = XUTDenoiser(config)
    state = {k: v.to(device=device, dtype=dtype if dtype is not None else v.dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    return model
