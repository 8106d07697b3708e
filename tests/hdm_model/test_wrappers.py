import pytest
import torch

from hdm_model import LatentVAE, TextEncoder

from ..tiny_models import make_tiny_text_encoder, make_tiny_vae


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory):
    path = make_tiny_text_encoder(tmp_path_factory.mktemp("te"))
    return TextEncoder.from_pretrained(str(path), max_length=12)


def test_training_pads_right_to_max_length(text_encoder):
    states = text_encoder(["a photo of a cat", "red square"], padding="max_length")
    assert states.shape == (2, 12, 32)
    assert torch.isfinite(states).all()
    ids = text_encoder.tokenizer(["red square"], padding="max_length", max_length=12)["input_ids"][0]
    n_real = len(text_encoder.tokenizer("red square")["input_ids"])
    assert ids[n_real:] == [text_encoder.tokenizer.pad_token_id] * (12 - n_real)  # right padding


def test_output_is_the_final_normalised_hidden_state(text_encoder):
    batch = text_encoder.tokenizer(["a photo of a cat"], return_tensors="pt")
    with torch.no_grad():
        hidden = text_encoder.model(**batch, output_hidden_states=True)
    expected = hidden.last_hidden_state
    torch.testing.assert_close(text_encoder(["a photo of a cat"], padding="longest"), expected)
    # Qwen3's last hidden state is after its final RMSNorm: unit RMS up to the norm gain (1 at init).
    rms = expected.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=1e-3)


def test_empty_prompt_never_yields_zero_tokens(text_encoder):
    alone = text_encoder([""], padding="longest")
    assert alone.shape[1] >= 1 and torch.isfinite(alone).all()
    padded = text_encoder(["", "a cat"], padding="max_length")
    assert padded.shape == (2, 12, 32) and torch.isfinite(padded).all()


def test_long_prompt_truncated_in_training_not_in_inference(text_encoder):
    long = " ".join(["masterpiece"] * 30)
    assert text_encoder([long], padding="max_length").shape[1] == 12
    assert text_encoder([long], padding="longest").shape[1] > 12


def test_text_encoder_is_frozen(text_encoder):
    text_encoder.train()
    assert not text_encoder.model.training
    assert not any(p.requires_grad for p in text_encoder.parameters())


def test_cache_returns_the_uncached_states_and_encodes_only_misses(tmp_path):
    path = make_tiny_text_encoder(tmp_path)
    plain = TextEncoder.from_pretrained(str(path), max_length=12)
    cached = TextEncoder.from_pretrained(str(path), max_length=12, cache_size=3)
    rows = []
    cached.model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    first = ["red square", "", "red square", "blue circle"]
    torch.testing.assert_close(cached(first), plain(first), atol=1e-5, rtol=1e-5)
    assert rows == [2, 1]  # the distinct misses, once each; then the empty prompt, kept apart
    second = ["blue circle", "green triangle", ""]
    torch.testing.assert_close(cached(second), plain(second), atol=1e-5, rtol=1e-5)
    assert rows == [2, 1, 1]
    cached(["yellow star", "red square"])
    assert rows == [2, 1, 1, 1]
    # LRU at 3 entries ("" is not one of them): "blue circle" (least recently used) went
    assert list(cached._cache) == ["green triangle", "yellow star", "red square"]
    cached(["blue circle"])
    assert rows == [2, 1, 1, 1, 1]
    # inference pads to the longest prompt of the batch: never cached
    torch.testing.assert_close(cached(["red square"], padding="longest"), plain(["red square"], padding="longest"))
    assert rows == [2, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("per_channel", [True, False])
def test_vae_normalisation(tmp_path, per_channel):
    path = make_tiny_vae(tmp_path / "vae", per_channel_stats=per_channel)
    vae = LatentVAE.from_pretrained(str(path), chunk_size=2)
    if per_channel:
        torch.testing.assert_close(vae.mean.flatten(), torch.tensor([0.1, -0.2, 0.3, 0.0]))
        torch.testing.assert_close(vae.std.flatten(), torch.tensor([2.0, 1.5, 1.0, 0.5]))
    else:  # z = (latent - shift) * scaling
        torch.testing.assert_close(vae.mean.flatten(), torch.full((4,), 0.25))
        torch.testing.assert_close(vae.std.flatten(), torch.full((4,), 2.0))
    images = torch.rand(3, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = vae.encode(images)
    assert mean.shape == std.shape == (3, 4, 4, 6) and (std > 0).all()
    with torch.no_grad():
        dist = vae.vae.encode(images).latent_dist
    torch.testing.assert_close(mean * vae.std + vae.mean, dist.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std * vae.std, dist.std, atol=1e-5, rtol=1e-5)
    decoded = vae.decode(mean)
    with torch.no_grad():
        raw = vae.vae.decode(dist.mean).sample
    assert decoded.shape == (3, 3, 32, 48)
    torch.testing.assert_close(decoded, ((raw + 1) / 2).clamp(0, 1), atol=1e-5, rtol=1e-5)
    assert vae.scale_factor == 8 and vae.latent_channels == 4
