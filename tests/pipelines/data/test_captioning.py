import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.data.captioning import Captioner, merge_caption

from tests.tiny_models import CORPUS, make_tiny_captioner


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory):
    return make_tiny_captioner(tmp_path_factory.mktemp("tiny_captioner"))


@pytest.fixture(scope="module")
def captioner(captioner_dir):
    return Captioner(str(captioner_dir))


@pytest.fixture
def images():
    """Three sizes and modes (grey, RGBA, RGB) of random content."""
    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 256, (24, 40), dtype=np.uint8), mode="L")
    rgba = Image.fromarray(rng.integers(0, 256, (33, 17, 4), dtype=np.uint8), mode="RGBA")
    rgb = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), mode="RGB")
    return [grey, rgba, rgb]


def test_one_clean_caption_per_image(captioner, images):
    captions = captioner(images)
    assert len(captions) == len(images)
    for caption in captions:
        assert isinstance(caption, str) and caption
        assert caption == caption.strip() and "\n" not in caption
    assert captioner([]) == []
    assert sum(p.numel() for p in captioner.model.parameters()) < 100_000


def test_captions_are_deterministic_and_in_order(captioner, captioner_dir, images):
    captions = captioner(images)
    assert captioner(images) == captions
    assert Captioner(str(captioner_dir))(images) == captions  # a second load of the saved directory
    assert captioner(images[::-1]) == captions[::-1]


def test_max_new_tokens_bounds_the_caption(captioner, captioner_dir, images):
    short = Captioner(str(captioner_dir), max_new_tokens=3)(images)
    full = captioner(images)
    count = lambda text: len(captioner.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert all(count(caption) <= 3 for caption in short)
    assert all(count(caption) <= captioner.max_new_tokens for caption in full)
    assert any(count(caption) > 3 for caption in full)  # the bound is what stopped the short ones
    assert all(long.startswith(s) for s, long in zip(short, full))  # greedy: a prefix of the longer run


def test_prompt_needs_a_processor_that_takes_text(captioner_dir):
    with pytest.raises(ValueError, match="prompt"):
        Captioner(str(captioner_dir), prompt="a photo of")


def _make_tiny_blip(directory):
    """A 2-layer BLIP with a BlipProcessor (image processor + uncased WordPiece tokenizer), as Salesforce/blip-*."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS + ["a photography of"], trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.save(str(directory / "tokenizer.json"))
    tokenizer = BertTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = BlipConfig(projection_dim=32, vision_config=dict(image_size=32, patch_size=8, **small),
                        text_config=dict(vocab_size=len(tokenizer), encoder_hidden_size=32, max_position_embeddings=64,
                                         bos_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                                         pad_token_id=tokenizer.pad_token_id, **small))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BlipForConditionalGeneration(config).save_pretrained(directory)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(directory)
    return directory


def test_prompt_conditions_a_processor_model_and_is_removed(tmp_path, images):
    blip = Captioner(str(_make_tiny_blip(tmp_path)), prompt="A photography of", max_new_tokens=6)
    assert type(blip.processor).__name__ == "BlipProcessor"
    captions = blip(images)
    # The reference: what the model generates from the same prompt, which BLIP's output starts with (lowercased).
    rgb = [image.convert("RGB") for image in images]
    inputs = blip.processor(images=rgb, text=["A photography of"] * 3, return_tensors="pt")
    raw = blip.tokenizer.batch_decode(blip.model.generate(**inputs, max_new_tokens=6), skip_special_tokens=True)
    assert all(text.startswith("a photography of") for text in raw)
    assert captions == [text.removeprefix("a photography of").strip() for text in raw]
    assert all(captions) and captions != Captioner(str(tmp_path), max_new_tokens=6)(images)  # the prompt conditions


@pytest.mark.parametrize("existing, generated, policy, expected", [
    ("1girl, solo", "a cat", "replace", "a cat"),
    (None, "a cat", "replace", "a cat"),
    ("1girl, solo", "a cat", "append", "1girl, solo, a cat"),
    ("  1girl  ", "a cat", "append", "1girl, a cat"),
    ("", "a cat", "append", "a cat"),
    ("   ", "a cat", "append", "a cat"),
    (None, "a cat", "append", "a cat"),
    ("1girl", "", "append", "1girl"),
])
def test_merge_caption(existing, generated, policy, expected):
    assert merge_caption(existing, generated, policy) == expected


def test_merge_caption_rejects_unknown_policy():
    with pytest.raises(ValueError, match="policy"):
        merge_caption("a", "b", "prepend")
