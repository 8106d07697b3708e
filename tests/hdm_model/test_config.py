import subprocess
import sys

import pytest
import torch

from hdm_model import OFFICIAL_XUT_BASE_ARCH, XUTConfig, build_denoiser, count_parameters


@pytest.mark.parametrize("preset, expected", [
    ("xut-small", 237_290_128),
    ("xut-base", 343_176_208),
    ("xut-large", 555_628_816),
])
def test_paper_parameter_counts_are_exact(preset, expected):
    with torch.device("meta"):
        model = build_denoiser(preset)
    assert count_parameters(model) == expected


def test_released_module_counts():
    """hdm_spec 2.8: the per-module split of the released model."""
    with torch.device("meta"):
        model = build_denoiser("xut-base")
    assert count_parameters(model.backbone) == 235_063_296
    assert count_parameters(model.pre_blocks) == 13_642_240
    assert count_parameters(model.post_blocks) == 40_926_720
    assert count_parameters(model.modulation) == 50_359_296
    assert count_parameters(model.aspect_embed) == 1_051_648
    assert count_parameters(model.patch_embed) == 17_408
    assert count_parameters(model.unpatch) == 16_400


def test_official_arch_reads_as_xut_base():
    assert XUTConfig.from_official_arch(OFFICIAL_XUT_BASE_ARCH) == XUTConfig.preset("xut-base")


def test_official_arch_rejects_unsupported_options():
    with pytest.raises(ValueError, match="dec_ctx"):
        XUTConfig.from_official_arch({**OFFICIAL_XUT_BASE_ARCH, "dec_ctx": True})
    with pytest.raises(ValueError, match="unknown keys"):
        XUTConfig.from_official_arch({**OFFICIAL_XUT_BASE_ARCH, "mystery": 1})


@pytest.mark.parametrize("bad", [dict(head_dim=30, heads=2, dim=60), dict(heads=3), dict(tread_rate=1.0),
                                 dict(attn_kernel="flash3"), dict(depth=0), dict(checkpointing="some")])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        XUTConfig.preset("tiny", **bad)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="xut-base"):
        XUTConfig.preset("xut-huge")


def test_config_dict_round_trip():
    config = XUTConfig.preset("tiny", checkpointing="full")
    assert XUTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="bogus"):
        XUTConfig.from_dict({**config.to_dict(), "bogus": 1})


def test_legacy_grad_checkpointing_key_is_read():
    """Checkpoints written before the policy hold the boolean; an explicit policy wins."""
    data = XUTConfig.preset("tiny").to_dict()
    del data["checkpointing"]
    assert XUTConfig.from_dict({**data, "grad_checkpointing": True}).checkpointing == "full"
    assert XUTConfig.from_dict({**data, "grad_checkpointing": False}).checkpointing == "none"
    assert XUTConfig.from_dict({**data, "grad_checkpointing": True, "checkpointing": "mlp"}).checkpointing == "mlp"
    assert "grad_checkpointing" not in XUTConfig.preset("tiny").to_dict()


def test_model_package_imports_no_ray_mlflow_pydantic():
    code = ("import sys, hdm_model, hdm_model.text_encoder, hdm_model.vae, hdm_model.compile; "
            "bad = [m for m in ('ray', 'mlflow', 'pydantic') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
