"""Unit checks of the precompute job's planning (no cluster)."""

from __future__ import annotations

import pytest

from pipelines.precompute import default_encoders


@pytest.mark.parametrize(("resources", "gpus", "captioners", "blocks", "expected"), [
    ({"CPU": 2.0}, 0.0, 0, 100, 2),  # one per core
    ({"CPU": 2.0}, 0.0, 0, 1, 1),  # one img2dataset shard is one block: one encoder can work on it
    ({"CPU": 8.0}, 0.0, 2, 100, 6),  # cores left by CPU captioners
    ({"CPU": 1.0}, 0.0, 2, 100, 1),  # never none
    ({"CPU": 16.0, "GPU": 4.0}, 1.0, 0, 100, 4),  # one per GPU
    ({"CPU": 16.0, "GPU": 4.0}, 0.5, 0, 100, 8),
    ({"CPU": 16.0, "GPU": 4.0}, 1.0, 0, 3, 3),
])
def test_default_encoders(resources, gpus, captioners, blocks, expected):
    assert default_encoders(resources, gpus, cpu_captioners=captioners, blocks=blocks) == expected
