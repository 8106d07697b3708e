"""benchmarks/text_kernels.py on a tiny random Qwen3 (CPU, fp32): masked SDPA keeps the masked eager states, pads
included; dropping the mask changes the pads' states only; a kernel that cannot run is reported, not raised."""

import pytest
import torch

from benchmarks.text_kernels import caption_batch, compare_kernels, print_table

pytestmark = pytest.mark.usefixtures("one_thread")


def _config():
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, max_position_embeddings=512, pad_token_id=0)


@pytest.fixture(scope="module")
def rows():
    torch.manual_seed(0)
    rows = compare_kernels(_config(), device="cpu", dtype=torch.float32, batch=8, length=32, reps=1,
                           kernels=("eager", "sdpa", "sdpa-unmasked", "flash_attention_2", "no-such-kernel"))
    return {row["kernel"]: row for row in rows}


def test_masked_sdpa_keeps_every_state(rows):
    sdpa = rows["sdpa"]
    assert sdpa["exact"] and sdpa["max_abs_diff"] < 1e-5 and sdpa["ms"] > 0
    assert sdpa["sdpa_backend"]  # the backend torch picked, asked with the real call's arguments
    assert "max_abs_diff" not in rows["eager"] and rows["eager"]["sdpa_backend"] is None


def test_dropping_the_mask_changes_the_pads_only(rows):
    unmasked = rows["sdpa-unmasked"]
    assert unmasked["max_abs_diff_attended"] < 1e-5  # causal + right padding: real tokens never see a pad
    assert unmasked["max_abs_diff_pad"] > 1e-2 and not unmasked["exact"]


def test_a_kernel_that_cannot_run_is_an_error_row(rows, capsys):
    assert list(rows) == ["eager", "sdpa", "sdpa-unmasked", "flash_attention_2", "no-such-kernel"]
    for name in ("flash_attention_2", "no-such-kernel"):
        assert rows[name]["error"] and "ms" not in rows[name]
    print_table(list(rows.values()))
    assert "no-such-kernel  error:" in capsys.readouterr().out


def test_caption_batch_is_right_padded_like_tokenize():
    ids, mask = caption_batch(64, 40, vocab_size=300, pad_id=0, seed=1)
    assert ids.shape == mask.shape == (64, 40) and mask.dtype == torch.int64
    n = mask.sum(dim=1)
    assert (n >= 1).all() and n.float().std() > 0  # varied lengths, never zero attended tokens
    assert torch.equal(mask, (torch.arange(40)[None] < n[:, None]).long())  # right padding
    empty = (n == 1) & (ids[:, 0] == 0)
    assert 0 < int(empty.sum()) < 64  # caption dropout: an empty prompt attends one pad
    assert (ids[mask == 0] == 0).all() and (ids[empty] == 0).all()
    assert (ids[mask.bool() & ~empty[:, None]] != 0).all()  # a real token is never the pad token
    assert torch.equal(caption_batch(64, 40, vocab_size=300, pad_id=0, seed=1)[0], ids)
