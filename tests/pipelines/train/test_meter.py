"""What a training stage logs per interval (pipelines/train/meter.py)."""

from __future__ import annotations

import math
import time

import pytest

from pipelines.train.meter import Meter


def test_flush_averages_the_steps_since_the_last_flush_and_starts_anew():
    meter = Meter()
    with meter.waiting():
        time.sleep(0.05)
    meter.record(loss=2.0, grad_norm=1.0)
    meter.record(loss=None, grad_norm=3.0)  # a rank that trained only blank batches in the step
    meter.record(loss=4.0, grad_norm=5.0)
    stats = meter.flush(samples_per_step=8, tokens_per_sample=16)
    assert (stats["loss"], stats["grad_norm"], meter.last_loss) == (3.0, 3.0, 4.0)
    elapsed = 3 / stats["steps_per_s"]
    assert stats["samples_per_s"] == pytest.approx(3 * 8 / elapsed)
    assert stats["image_tokens_per_s"] == pytest.approx(3 * 8 * 16 / elapsed)
    assert 0.05 <= stats["data_wait"] * elapsed < elapsed
    meter.record(loss=None, grad_norm=1.0)
    again = meter.flush(samples_per_step=8, tokens_per_sample=16)
    assert math.isnan(again["loss"]) and again["grad_norm"] == 1.0 and again["data_wait"] == 0.0
