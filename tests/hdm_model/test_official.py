import re

import pytest
import torch

from hdm_model import (OFFICIAL_XUT_BASE_ARCH, XUTConfig, build_denoiser, load_official_hdm, official_key_map,
                       ours_to_official)
from hdm_model.official import DENOISER_PREFIX

from .conftest import tiny_inputs
from .original_layouts import arch_of


def test_round_trip_through_the_official_layout(tiny_model, tmp_path):
    from safetensors.torch import save_file

    tiny_model.eval()
    state = ours_to_official(tiny_model)
    assert all(k.startswith(DENOISER_PREFIX) for k in state)
    state["vae.encoder.conv_in.weight"] = torch.zeros(3)  # VAE weights ride along and are ignored
    path = tmp_path / "hdm.safetensors"
    save_file(state, path)
    arch = arch_of(tiny_model.config)
    for source in (path, state):
        loaded = load_official_hdm(source, arch).eval()
        x, t, ctx = tiny_inputs(tiny_model.config)
        aspect = torch.tensor([0.3, -0.2])
        torch.testing.assert_close(loaded(x, t, ctx, aspect=aspect), tiny_model(x, t, ctx, aspect=aspect),
                                   atol=0, rtol=0)


def test_missing_and_unexpected_keys_are_named(tiny_model):
    arch = arch_of(tiny_model.config)
    state = ours_to_official(tiny_model)
    del state["unet.model.backbone.dec_blocks.1.0.xattn.kv.weight"]
    with pytest.raises(KeyError, match=r"missing keys: backbone\.dec_blocks\.1\.0\.xattn\.kv\.weight"):
        load_official_hdm(state, arch)
    state = ours_to_official(tiny_model)
    state["unet.model.backbone.enc_blocks.0.0.attn.lora_up.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"unexpected keys: backbone\.enc_blocks\.0\.0\.attn\.lora_up\.weight"):
        load_official_hdm(state, arch)


def test_wrong_shape_and_time_buffer_are_refused(tiny_model):
    arch = arch_of(tiny_model.config)
    state = ours_to_official(tiny_model)
    state["unet.model.ctx_proj.weight"] = torch.zeros(64, 31)
    with pytest.raises(ValueError, match="ctx_proj.weight"):
        load_official_hdm(state, arch)
    state = ours_to_official(tiny_model)
    state["unet.model.time_emb.freqs"] = state["unet.model.time_emb.freqs"] * 2
    with pytest.raises(ValueError, match="time_emb.freqs"):
        load_official_hdm(state, arch)


# The released file's layout, as hdm_spec 2.8 lists it (block tensor stems, top-level modules).
_RELEASED_BLOCK_STEMS = ["attn.qkv", "attn.out", "attn.rope.freqs", "mlp.w12", "mlp.w3", "attn_pre_norm.norm",
                         "mlp_pre_norm.norm"]
_RELEASED_CROSS_STEMS = ["xattn.q", "xattn.kv", "xattn.out", "xattn.rope.freqs", "xattn_pre_norm.norm"]
_RELEASED_TOP = ["in_patch.proj", "out_patch.proj", "time_emb.freqs", "time_emb.proj.0", "ctx_proj",
                 "addon_info_embs_proj.0", "addon_info_embs_proj.2"] + [
    f"shared_adaln_{k}.{n}" for k in ("attn", "xattn", "ffw") for n in (0, 1, 3)]


def test_every_released_key_is_in_the_table():
    table = official_key_map(XUTConfig.from_official_arch(OFFICIAL_XUT_BASE_ARCH))
    stems = {re.sub(r"\.(weight|bias)$", "", k) for k in table}
    expected = set(_RELEASED_TOP)
    for k in range(1):
        expected |= {f"prev_tread_trns.blocks.{k}.{s}" for s in _RELEASED_BLOCK_STEMS}
    for k in range(3):
        expected |= {f"post_tread_trns.blocks.{k}.{s}" for s in _RELEASED_BLOCK_STEMS}
    for i in range(4):
        expected |= {f"backbone.enc_blocks.{i}.0.{s}" for s in _RELEASED_BLOCK_STEMS}
        for j in range(3):
            expected |= {f"backbone.dec_blocks.{i}.{j}.{s}" for s in _RELEASED_BLOCK_STEMS}
        expected |= {f"backbone.dec_blocks.{i}.0.{s}" for s in _RELEASED_CROSS_STEMS}
    assert stems == expected
    assert sum(v is None for v in table.values()) == 1  # only the recomputed time-embedding buffer


def test_default_arch_loads_a_state_dict_of_the_released_layout():
    """A full-size state dict in the released layout (uninitialised values) loads into xut-base."""
    with torch.device("meta"):
        reference = build_denoiser("xut-base")
    state = {k: torch.empty(v.shape) if v.is_meta else v for k, v in ours_to_official(reference).items()}
    model = load_official_hdm(state)
    assert model.config == XUTConfig.preset("xut-base")
    assert sum(p.numel() for p in model.parameters()) == 343_176_208
    assert not any(p.is_meta for p in model.parameters())
