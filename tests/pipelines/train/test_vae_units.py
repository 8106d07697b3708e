"""EQ-VAE job pieces that need no cluster: crops with scale augmentation, config checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipelines.train.config import VAETrainConfig
from pipelines.train.eqvae import to_images


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
