"""TextEncoder's two steps (tokenize in any thread, encode_tokens on the device), the empty prompt encoded once,
and the attention mask it hands to the model."""

import copy
import sys
import threading

import pytest
import torch

from hdm_model import TextEncoder
from hdm_model.text_encoder import Tokens, model_attention_mask

from ..tiny_models import make_tiny_text_encoder

pytestmark = pytest.mark.usefixtures("one_thread")

MIXED = ["", "a photo of a cat", "", "", "red square\non a blue background", "the quick brown fox", ""]


@pytest.fixture(scope="module")
def te_dir(tmp_path_factory):
    return make_tiny_text_encoder(tmp_path_factory.mktemp("te"))


@pytest.fixture
def encoder(te_dir):
    return TextEncoder.from_pretrained(str(te_dir), max_length=12)


def _counting(encoder) -> list[int]:
    """The batch size of every call of the encoder's model, appended as it happens."""
    rows = []
    encoder.model.register_forward_pre_hook(lambda m, args, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                            with_kwargs=True)
    return rows


def _as_before(encoder, prompts, padding):
    """What TextEncoder.forward computed before Tokens: one batch, the transformers-built mask."""
    batch = encoder.tokenizer([p.replace("\n", " ") for p in prompts], padding=padding,
                              truncation=padding == "max_length", max_length=encoder.max_length, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if ids.shape[1] == 0:
        ids = torch.full((len(prompts), 1), encoder.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
    mask[mask.sum(dim=1) == 0, 0] = 1
    with torch.no_grad():
        return encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("padding", ["max_length", "longest"])
@pytest.mark.parametrize("prompts", [MIXED, [""], ["", ""], ["line one\nline two", "\n"]])
def test_forward_is_tokenize_then_encode_and_keeps_the_results(encoder, prompts, padding):
    tokens = encoder.tokenize(prompts, padding=padding)
    assert isinstance(tokens, Tokens) and tokens.padding == padding
    assert tokens.ids.dtype == tokens.mask.dtype == torch.int64 and tokens.ids.device.type == "cpu"
    assert "\n" not in "".join(tokens.prompts) and (tokens.mask.sum(dim=1) >= 1).all()
    states = encoder(prompts, padding=padding)
    assert torch.equal(states, encoder.encode_tokens(tokens))
    # fp32 on CPU: bit for bit what one batch with transformers' own mask gives, empty rows encoded apart or not
    torch.testing.assert_close(states, _as_before(encoder, prompts, padding), atol=0, rtol=0)


def test_cache_path_keeps_the_results(te_dir):
    cached = TextEncoder.from_pretrained(str(te_dir), max_length=12, cache_size=8)
    for _ in range(2):  # misses, then hits
        torch.testing.assert_close(cached(MIXED), _as_before(cached, MIXED, "max_length"), atol=0, rtol=0)
    assert "" not in cached._cache


def test_empty_prompt_encoded_once_per_dtype(encoder):
    expected = _as_before(encoder, MIXED, "max_length")
    rows = _counting(encoder)
    for _ in range(3):
        torch.testing.assert_close(encoder(MIXED), expected, atol=0, rtol=0)
    assert rows == [3, 1, 3, 3]  # the three real prompts each time, the empty one once
    assert encoder(["", ""]).shape == (2, 12, 32) and rows == [3, 1, 3, 3]  # no real prompt: no call at all
    encoder(["a photo of a cat"])
    assert rows == [3, 1, 3, 3, 1]
    encoder.model.double()  # another dtype: its own empty states
    assert encoder(["", ""]).dtype == torch.float64 and rows == [3, 1, 3, 3, 1, 1]


def test_tokenize_is_thread_safe(encoder):
    prompts = [f"{'a photo of a cat ' * (i % 7)}red square {i}" for i in range(16)]
    expected = encoder.tokenize(prompts)
    failures, results = [], []

    def work():
        try:
            for i in range(200):
                results.append(encoder.tokenize(prompts, padding="max_length" if i % 2 else "longest"))
        except Exception as error:  # "Already borrowed" without the lock
            failures.append(error)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so that unguarded calls would overlap
    try:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not failures
    assert len(results) == 800
    for tokens in results:
        if tokens.padding == "max_length":
            assert torch.equal(tokens.ids, expected.ids) and torch.equal(tokens.mask, expected.mask)


def test_pin_memory_only_with_cuda(encoder, monkeypatch):
    tokens = encoder.tokenize(["a cat", ""])
    if not torch.cuda.is_available():
        assert tokens.pin_memory() is tokens
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self.clone())  # stands in for pinning
    pinned = tokens.pin_memory()
    assert pinned is not tokens and pinned.ids is not tokens.ids and pinned.mask is not tokens.mask
    assert torch.equal(pinned.ids, tokens.ids) and torch.equal(pinned.mask, tokens.mask)
    assert (pinned.prompts, pinned.padding) == (tokens.prompts, tokens.padding)


def test_sdpa_gets_the_mask_transformers_builds_without_reading_it(encoder, monkeypatch):
    assert encoder.model.config._attn_implementation == "sdpa"
    from transformers import masking_utils

    def read_on_host(tensor):
        raise AssertionError("the padding mask was read on the host (a GPU sync)")

    monkeypatch.setattr(masking_utils, "fast_all", read_on_host)
    with pytest.raises(AssertionError, match="read on the host"):  # what transformers does with a 2D mask
        _as_before(encoder, MIXED, "max_length")
    encoder(MIXED)
    tokens = encoder.tokenize(MIXED)
    mask = model_attention_mask(encoder.model, tokens.mask)
    assert mask.shape == (7, 1, 12, 12) and mask.dtype == torch.bool
    n_real = int(tokens.mask[1].sum())
    assert mask[1, 0, -1].tolist() == [True] * n_real + [False] * (12 - n_real)  # a pad query sees the real keys
    assert mask[1, 0, 0].tolist() == [True] + [False] * 11  # causal
    encoder.model.set_attn_implementation("eager")  # eager: transformers' own mask (it does not read it)
    assert model_attention_mask(encoder.model, tokens.mask) is tokens.mask


def test_from_pretrained_passes_dtype_and_attention(te_dir):
    encoder = TextEncoder.from_pretrained(str(te_dir), max_length=12, dtype=torch.bfloat16,
                                         attn_implementation="eager")
    assert encoder.model.dtype == torch.bfloat16 and encoder.model.config._attn_implementation == "eager"
    assert encoder(["a cat", ""]).dtype == torch.bfloat16
    assert TextEncoder.from_pretrained(str(te_dir)).model.dtype == torch.float32  # default_dtype on CPU


def test_copies_get_their_own_lock(encoder):
    twin = copy.deepcopy(encoder)
    assert twin._lock is not encoder._lock
    assert torch.equal(twin.tokenize(["a cat"]).ids, encoder.tokenize(["a cat"]).ids)


def test_compiled_encoder_keeps_the_states(te_dir):
    """The worker compiles the text encoder: the mask made here and the batch of real rows (varying with caption
    dropout) trace without a graph break, and the states stay the eager ones."""
    from hdm_model.compile import compile_text_encoder

    plain = TextEncoder.from_pretrained(str(te_dir), max_length=12)
    compiled = compile_text_encoder(TextEncoder.from_pretrained(str(te_dir), max_length=12), "blocks",
                                    backend="aot_eager")
    torch._dynamo.utils.counters.clear()
    for prompts in (MIXED, ["a photo of a cat", "", "red square", "blue circle", "green"], ["", "x"]):
        torch.testing.assert_close(compiled(prompts), plain(prompts))
    assert not torch._dynamo.utils.counters["graph_break"]
