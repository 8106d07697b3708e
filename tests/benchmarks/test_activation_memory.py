"""benchmarks/activation_memory.py on the tiny preset: the fake-tensor measurement is the real one, and the
policies order as they should."""

from __future__ import annotations

import pytest

from hdm_model import XUTConfig
from tests.benchmarks import load_script

TINY = XUTConfig.preset("tiny")  # TREAD 0.5 in training mode
RES, N_TEXT = 64, 8  # 8x8 latent -> 16 image tokens


def _load():
    return load_script("activation_memory")


@pytest.fixture(scope="module")
def memory():
    return _load()


@pytest.fixture(scope="module")
def fake_bf16(memory):
    return memory.measure(TINY, res=RES, n_text=N_TEXT, fake=True, autocast=True)


def test_fake_tensors_measure_what_real_tensors_save_in_fp32(memory):
    real = memory.measure(TINY, res=RES, n_text=N_TEXT, fake=False, autocast=False)
    fake = memory.measure(TINY, res=RES, n_text=N_TEXT, fake=True, autocast=False)
    assert fake == real


def test_fake_tensors_measure_what_real_tensors_save_under_bf16_autocast(memory, fake_bf16):
    """Equal but for the shared modulation's 3 LayerNorms on the (B, 1, D) condition: with a bf16 input the
    real CPU kernel keeps its mean and rstd (B, 1, 1) in fp32, the fake (meta) kernel says bf16, 2 bytes less
    each: 12 bytes per sample in hundreds of kilobytes (for xut-base: 12 bytes in 587 MiB)."""
    real = memory.measure(TINY, res=RES, n_text=N_TEXT, fake=False, autocast=True)
    assert real["block_per_sample"] == fake_bf16["block_per_sample"]
    for policy in memory.POLICIES:
        r, f = real["policies"][policy], fake_bf16["policies"][policy]
        assert r["fixed"] == f["fixed"]
        assert r["per_sample"] - f["per_sample"] == 3 * 2 * 2, policy


def test_no_checkpointing_saves_the_most_and_full_the_least(memory, fake_bf16):
    per_sample = {p: r["per_sample"] for p, r in fake_bf16["policies"].items()}
    assert set(per_sample) == set(memory.POLICIES)
    assert all(per_sample["none"] >= v for v in per_sample.values())
    assert all(per_sample["full"] < v for p, v in per_sample.items() if p != "full")


def test_report_picks_the_least_recomputation_that_fits(memory):
    """On a GPU sized so that only some policies fit the batch, the default is the first of them in the
    order none < outer < mlp < full, which is the order of recomputed FLOPs."""
    flops = memory.recompute_flops(TINY, res=RES, n_text=N_TEXT)
    assert [flops[p] for p in memory.POLICIES] == sorted(flops.values())
    result = memory.report(TINY, resolutions=[RES], n_text=N_TEXT, gpu_gib=0.02, headroom=0.1,
                           recipe_batch={RES: 11}, text_encoder_params=0)
    row = result["resolutions"][RES]
    batches = {p: r["max_batch"] for p, r in row["policies"].items()}
    assert batches["none"] < 11 <= batches["full"] == max(batches.values())  # the GPU is sized for this
    fitting = [p for p in memory.POLICIES if batches[p] >= 11]
    assert row["default"] == fitting[0] != "none"
