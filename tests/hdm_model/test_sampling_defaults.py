"""A checkpoint's sampling.json (hdm_model.checkpoint.SamplingDefaults) and HDMPipeline's use of it: real tiny
models on CPU."""

import json

import numpy as np
import pytest
import torch

from hdm_model import HDMPipeline, build_denoiser, checkpoint
from hdm_model.checkpoint import SAMPLING, SamplingDefaults, read_sampling_defaults, write_sampling_defaults
from hdm_model.pipeline import PARAMETERS_KEY

from ..tiny_models import make_tiny_text_encoder, make_tiny_vae, write_tiny_checkpoint
from .conftest import _randomise_zero_inits

SMALL = dict(width=32, height=32, steps=2)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("defaults")
    torch.manual_seed(0)
    model = build_denoiser("tiny", ctx_dim=32)
    _randomise_zero_inits(model)  # zero-init gates would make every guidance setting draw the same image
    return write_tiny_checkpoint(root / "ckpt", model=model, text_encoder=make_tiny_text_encoder(root / "te"),
                                 vae=make_tiny_vae(root / "vae"), stage={"res": 32})


def used(image) -> tuple[float, float | None]:
    params = json.loads(image.info[PARAMETERS_KEY])
    return params["cfg_scale"], params["uncond_tread_rate"]


def test_write_then_read_leaves_the_weights_and_meta_alone(ckpt):
    before = {name: (ckpt / name).read_bytes() for name in (checkpoint.WEIGHTS, checkpoint.META)}
    assert read_sampling_defaults(ckpt) is None  # optional: a checkpoint without one has none
    defaults = SamplingDefaults(cfg_scale=2.5, uncond_tread_rate=0.3, source="a test")
    assert write_sampling_defaults(ckpt, defaults) == ckpt / SAMPLING
    assert read_sampling_defaults(ckpt) == defaults
    write_sampling_defaults(ckpt, SamplingDefaults(cfg_scale=4.0, uncond_tread_rate=None))  # replaced whole
    assert read_sampling_defaults(ckpt) == SamplingDefaults(cfg_scale=4.0, uncond_tread_rate=None, source="")
    assert {name: (ckpt / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([*before, SAMPLING])  # no temporary file left
    (ckpt / SAMPLING).unlink()


def test_written_only_into_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a checkpoint directory"):
        write_sampling_defaults(tmp_path, SamplingDefaults(cfg_scale=2.0, uncond_tread_rate=0.0))
    assert not (tmp_path / SAMPLING).exists()


@pytest.mark.parametrize("content, why", [
    ("{not json", "Expecting property name"),
    ("[2.5, 0.3]", "not a JSON object"),
    ('{"uncond_tread_rate": 0.3}', "no cfg_scale"),
    ('{"cfg_scale": "high", "uncond_tread_rate": 0.3}', "cfg_scale must be a positive number"),
    ('{"cfg_scale": 2.0, "uncond_tread_rate": 1.5}', r"uncond_tread_rate must be null or in \[0, 1\)"),
    ('{"cfg_scale": 2.0, "uncond_tread_rate": 0.1, "cfg": 3}', r"unknown keys \['cfg'\]"),
    (b"\xff\xfe\x00", "Expecting value"),
])
def test_a_corrupt_file_is_refused_naming_it(tmp_path, content, why):
    (tmp_path / SAMPLING).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=why) as e:
        read_sampling_defaults(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / SAMPLING} is not valid sampling defaults")


def test_pipeline_uses_the_checkpoint_defaults_unless_a_call_names_its_own(ckpt):
    plain = HDMPipeline.from_checkpoint(ckpt, dtype=torch.float32)
    assert plain.sampling_defaults is None and plain.guidance() == (3.0, None)
    assert used(plain(["red square"], seeds=1, **SMALL)[0]) == (3.0, None)

    write_sampling_defaults(ckpt, SamplingDefaults(cfg_scale=2.0, uncond_tread_rate=0.5, source="test"))
    try:
        pipe = HDMPipeline.from_checkpoint(ckpt, dtype=torch.float32)
    finally:
        (ckpt / SAMPLING).unlink()
    assert pipe.sampling_defaults.source == "test"
    default = pipe(["red square"], seeds=1, **SMALL)[0]
    assert used(default) == (2.0, 0.5)
    explicit = pipe(["red square"], seeds=1, cfg_scale=2.0, uncond_tread_rate=0.5, **SMALL)[0]
    np.testing.assert_array_equal(np.asarray(default), np.asarray(explicit))  # the defaults are those settings
    assert used(pipe(["red square"], seeds=1, cfg_scale=4.0, **SMALL)[0]) == (4.0, 0.5)
    assert used(pipe(["red square"], seeds=1, uncond_tread_rate=0, **SMALL)[0]) == (2.0, 0)  # 0: routing off
    assert not np.array_equal(np.asarray(default), np.asarray(plain(["red square"], seeds=1, **SMALL)[0]))
