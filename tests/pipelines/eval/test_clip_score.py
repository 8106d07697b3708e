"""pipelines.eval.clip_score: a tiny random CLIP saved with save_pretrained and loaded by path, as a hub id is."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.eval.clip_score import ClipScorer

from tests.pipelines.eval.eval_models import make_tiny_clip

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROMPTS = ["a red square", "a blue circle", "a green triangle", "a yellow square"]


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    return ClipScorer(str(make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in PROMPTS]


def test_score_is_the_formula_on_the_models_own_embeddings(scorer, images):
    """100 * mean(max(cos, 0)), recomputed from get_image_features / get_text_features directly."""
    processor, model = scorer.processor, scorer.model
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        image_emb = model.get_image_features(pixel_values=pixels).pooler_output
        text_emb = model.get_text_features(**processor(text=PROMPTS, padding=True, return_tensors="pt")).pooler_output
    cos = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1)
    expected = 100 * cos.clamp(min=0)
    assert scorer.pair_scores(images, PROMPTS) == pytest.approx(expected.numpy(), abs=1e-4)
    value = scorer.score(images, PROMPTS)
    assert value == pytest.approx(float(expected.mean()), abs=1e-4) and 0 <= value <= 100


def test_pairs_are_scored_pairwise_in_any_order(scorer, images):
    pairs = scorer.pair_scores(images, PROMPTS)
    order = [2, 0, 3, 1]
    assert scorer.pair_scores([images[i] for i in order], [PROMPTS[i] for i in order]) == \
        pytest.approx(pairs[order], abs=1e-4)
    repeated = scorer.pair_scores(images[:2] * 2, PROMPTS[:2] * 2)  # a prompt drawn with several seeds
    assert repeated == pytest.approx(np.tile(pairs[:2], 2), abs=1e-4)


def test_negative_cosines_score_zero_and_refusals(scorer, images, tmp_path):
    """Negating the text projection flips every cosine: each pair then scores 100 |cos| one way and 0 the other."""
    pairs = scorer.pair_scores(images, PROMPTS)
    flipped = ClipScorer(scorer.model.name_or_path)
    with torch.no_grad():
        flipped.model.text_projection.weight.neg_()
    mirrored = flipped.pair_scores(images, PROMPTS)
    assert np.minimum(pairs, mirrored) == pytest.approx(np.zeros(len(PROMPTS)), abs=1e-6)
    assert pairs + mirrored == pytest.approx(np.abs(pairs - mirrored)) and (pairs + mirrored > 0).all()
    with pytest.raises(ValueError, match="one prompt per image, got 4 images and 3 prompts"):
        scorer.score(images, PROMPTS[:3])
    with pytest.raises(FileNotFoundError, match="no CLIP model at"):
        ClipScorer(str(tmp_path / "missing"))
