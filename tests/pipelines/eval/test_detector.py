"""pipelines.eval.detector: colour and shape read right on clean demo images, on perturbed ones (blur, halo,
tinted background, noise) and on a trained VAE's reconstructions: accuracy >= 0.95 on each, per condition."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.data.demo_data import COLORS, Scene
from pipelines.eval.adherence import Detection as AdherenceDetection
from pipelines.eval.adherence import detect as adherence_detect
from pipelines.eval.adherence import score
from pipelines.eval.detector import Detection, detect, nearest_color, overlaps
from tests.pipelines.eval.detector_cases import (PERTURBATIONS, clean_cases, perturbed)


def accuracy(cases) -> tuple[float, float]:
    found = [detect(image) for image, _ in cases]
    return (float(np.mean([d.color == s.color for d, (_, s) in zip(found, cases)])),
            float(np.mean([d.shape == s.shape for d, (_, s) in zip(found, cases)])))


@pytest.fixture(scope="module", params=[64, 32], ids=["64px", "32px"])
def clean(request):
    return clean_cases(size=request.param, per_scene=2, seed=1)  # 108: every colour x shape x background, twice


def test_clean_demo_images_are_read_exactly(clean):
    assert accuracy(clean) == (1.0, 1.0)


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_perturbed_demo_images_are_read_right(clean, name):
    images = perturbed(clean, name, seed=2)
    assert not any(np.array_equal(a, b) for (a, _), (b, _) in zip(images, clean))  # every image was perturbed
    color, shape = accuracy(images)
    assert color >= 0.95 and shape >= 0.95, (name, color, shape)


def _disc(size: int, radius: float, bumps: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] - size / 2
    angle = np.arctan2(yy, xx)
    return np.hypot(xx, yy) <= radius * (1 + bumps * np.sin(5 * angle + 1.0))


def test_shape_overlaps_rank_lumpy_circles_and_rounded_squares_as_people_do():
    lumpy = _disc(64, 16, 0.08)  # a circle with five lumps, as the demo's model draws them
    yy, xx = np.mgrid[0:64, 0:64]
    rounded = (np.maximum(np.abs(xx - 32), np.abs(yy - 32)) <= 15)  # a square with corners rounded off ...
    rounded &= np.hypot(np.maximum(np.abs(xx - 32) - 10, 0), np.maximum(np.abs(yy - 32) - 10, 0)) <= 5  # ... r = 5
    for mask, want in ((lumpy, "circle"), (rounded, "square")):
        scores = overlaps(mask)
        assert max(scores, key=scores.get) == want, (want, scores)
    assert overlaps(_disc(64, 16, 0.0))["circle"] > 0.97


def test_halo_and_stray_blob_do_not_change_the_shape():
    image = np.full((64, 64, 3), 240, np.uint8)  # a purple circle on white ...
    yy, xx = np.mgrid[0:64, 0:64]
    r = np.hypot(yy - 32, xx - 32)
    image[(r > 14) & (r <= 20)] = (215, 200, 235)  # ... in a faint purplish ring 6 px wide
    image[r <= 14] = COLORS["purple"]
    image[2:6, 50:60] = COLORS["blue"]  # and a stray blob in a corner
    found = detect(image)
    assert (found.color, found.shape) == ("purple", "circle") and found.match > 0.95


def test_plain_or_grey_images_have_no_detection():
    rng = np.random.default_rng(0)
    plain = np.clip(128 + rng.normal(scale=10, size=(64, 64, 3)), 0, 255).astype(np.uint8)
    assert detect(plain) == Detection(color=None, shape=None, match=0.0)
    grey = np.full((64, 64, 3), 240, np.uint8)
    grey[20:44, 20:44] = 60
    assert detect(grey).color is None and detect(grey).shape == "square"
    assert nearest_color(np.array([200.0, 190.0, 185.0])) is None


def test_adherence_keeps_the_detector_names_and_scores_against_captions():
    assert adherence_detect is detect and AdherenceDetection is Detection
    cases = clean_cases(size=32, per_scene=1, seed=4)[:6]
    images = [image for image, _ in cases]
    wrong = Scene(color="red" if cases[0][1].color != "red" else "blue", shape=cases[0][1].shape,
                  background=cases[0][1].background)
    result, rows = score(images, [wrong.caption] + [scene.caption for _, scene in cases[1:]])
    assert result.color == 5 / 6 and result.shape == 1.0 and not rows[0]["color_ok"] and rows[1]["color_ok"]
    with pytest.raises(ValueError, match="need one prompt per image"):
        score(images, [])
