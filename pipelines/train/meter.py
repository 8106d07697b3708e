"""What a training stage logs about its steps: loss, gradient norm, throughput and the share of time spent
waiting for data, averaged over the steps since the last log."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np


class Meter:
    """Loss, grad norm, throughput and the share of time spent waiting for data."""

    def __init__(self):
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.wait = 0.0
        self.since = time.perf_counter()
        self.last_loss = float("nan")

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Counts the time spent in the block as data wait."""
        start = time.perf_counter()
        yield
        self.wait += time.perf_counter() - start

    def record(self, *, loss: float | None, grad_norm: float) -> None:
        """`loss` None: this rank trained only blank batches in the step (ResumedEpoch)."""
        if loss is not None:
            self.losses.append(loss)
            self.last_loss = loss
        self.grad_norms.append(grad_norm)

    def flush(self, *, samples_per_step: int, tokens_per_sample: int) -> dict[str, float]:
        """The means and rates since the last flush (the steps of every rank: `samples_per_step`)."""
        elapsed = max(time.perf_counter() - self.since, 1e-9)
        steps = len(self.grad_norms)
        out = {"loss": float(np.mean(self.losses)) if self.losses else float("nan"),
               "grad_norm": float(np.mean(self.grad_norms)),
               "steps_per_s": steps / elapsed, "samples_per_s": steps * samples_per_step / elapsed,
               "image_tokens_per_s": steps * samples_per_step * tokens_per_sample / elapsed,
               "data_wait": self.wait / elapsed}
        self.losses, self.grad_norms, self.wait, self.since = [], [], 0.0, time.perf_counter()
        return out
