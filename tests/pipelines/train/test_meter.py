"""What a training stage logs per interval (pipelines/train/meter.py)."""

from __future__ import annotations

import math
import time

import pytest
import torch

from pipelines.train.meter import Meter

T = torch.tensor  # the step hands the meter device tensors


def test_flush_averages_the_steps_since_the_last_flush_and_starts_anew():
    meter = Meter()
    with meter.waiting():
        time.sleep(0.05)
    meter.record(loss=T(2.0), grad_norm=T(1.0))
    meter.record(loss=None, grad_norm=T(3.0))  # a rank that trained only blank batches in the step
    meter.record(loss=T(4.0), grad_norm=T(5.0))
    stats = meter.flush(samples_per_step=8, tokens_per_sample=16, step=3)
    assert (stats["loss"], stats["grad_norm"], meter.last_loss) == (3.0, 3.0, 4.0)
    elapsed = 3 / stats["steps_per_s"]
    assert stats["samples_per_s"] == pytest.approx(3 * 8 / elapsed)
    assert stats["image_tokens_per_s"] == pytest.approx(3 * 8 * 16 / elapsed)
    assert 0.05 <= stats["data_wait"] * elapsed < elapsed
    meter.record(loss=None, grad_norm=T(1.0))
    again = meter.flush(samples_per_step=8, tokens_per_sample=16, step=4)
    assert math.isnan(again["loss"]) and again["grad_norm"] == 1.0 and again["data_wait"] == 0.0


def test_a_non_finite_loss_is_caught_when_read_not_when_made():
    """Recording a NaN loss reads nothing (no wait for the device); the flush, or the check before a checkpoint,
    raises naming the step."""
    meter = Meter()
    meter.record(loss=T(1.0), grad_norm=T(1.0))
    meter.record(loss=T(float("nan")), grad_norm=T(1.0))
    with pytest.raises(FloatingPointError, match="before step 2"):
        meter.check_finite(2)
    with pytest.raises(FloatingPointError, match="non-finite flow-matching loss"):
        meter.flush(samples_per_step=1, tokens_per_sample=1, step=2)
