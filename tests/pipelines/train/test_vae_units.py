"""EQ-VAE job pieces that need no cluster: crops with scale augmentation, config checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipelines.train.config import VAETrainConfig
from pipelines.train.eqvae import to_images, training_images


def _rows(images: list[np.ndarray]) -> dict:
    return {"pixels": [a.tobytes() for a in images], "h": [a.shape[0] for a in images], "w": [a.shape[1] for a in images]}


def test_crops_shrink_images_by_a_random_factor_before_cropping():
    # vertical stripes 4 px wide (period 8): a 32 px crop at full scale crosses 7-8 stripe edges per row;
    # an image shrunk by f in [0.5, 1] has stripes 4f px wide: up to 16 edges, more on average
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, np.arange(64) % 8 >= 4] = 255
    rng = np.random.default_rng(0)
    full = to_images(_rows([image] * 100), 32, rng)
    shrunk = to_images(_rows([image] * 100), 32, rng, min_scale=0.5)
    assert full.shape == shrunk.shape == (100, 3, 32, 32)

    def edges(x):  # stripe edges along the middle row of each crop (resampled in-between values skipped)
        counts = []
        for row in x[:, 0, 16]:
            sure = row[row.abs() > 0.5] > 0
            counts.append(int((sure[1:] != sure[:-1]).sum()))
        return torch.tensor(counts, dtype=torch.float32)

    assert 7 <= edges(full).min() and edges(full).max() <= 8
    assert edges(shrunk).mean() > 9.5 and edges(shrunk).max() <= 16
    centre = to_images(_rows([image]), 32, None, min_scale=0.5)  # evaluation crops: never rescaled
    assert centre.shape == (1, 3, 32, 32) and 7 <= edges(centre).item() <= 8


def test_image_size_below_crop_size_is_refused():
    with pytest.raises(ValidationError, match=r"image_size \(32\) must be at least crop_size \(64\)"):
        VAETrainConfig(input="in", output="out", crop_size=64, image_size=32)


def test_every_nth_step_trains_on_whole_images_with_the_crops_pixels():
    # 16 distinct 64 px images (a different grey each, a white dot in one corner so a flip shows): steps 1-3
    # get 16 crops of 32 px; step 4 gets the first 4 images whole (4 x 64^2 = 16 x 32^2 pixels), flipped or not
    images = []
    for i in range(16):
        image = np.full((64, 64, 3), 10 * i, np.uint8)
        image[0, 0] = 255
        images.append(image)
    cfg = VAETrainConfig(input="in", output="out", crop_size=32, image_size=64, min_scale=0.5, batch_size=16,
                         whole_image_every=4)
    rng = np.random.default_rng(0)
    for step in (1, 2, 3, 5):
        assert training_images(_rows(images), cfg, rng, step=step).shape == (16, 3, 32, 32)
    whole = training_images(_rows(images), cfg, rng, step=4)
    assert whole.shape == (4, 3, 64, 64)
    for i, x in enumerate(whole):
        pixels = ((x.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
        assert np.array_equal(pixels, images[i]) or np.array_equal(pixels, images[i][:, ::-1])
    off = VAETrainConfig(input="in", output="out", crop_size=32, image_size=64, batch_size=16)
    assert all(training_images(_rows(images), off, rng, step=s).shape == (16, 3, 32, 32) for s in range(1, 9))


def test_whole_images_need_an_image_size_above_the_crop():
    with pytest.raises(ValidationError, match=r"whole_image_every needs an image_size above crop_size \(32\)"):
        VAETrainConfig(input="in", output="out", crop_size=32, whole_image_every=4)
