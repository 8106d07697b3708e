"""What a training stage logs about its steps: loss, gradient norm, throughput and the share of time spent
waiting for data, averaged over the steps since the last log.

Losses and gradient norms arrive as device tensors and are read (one wait for the GPU) only at a flush: the
steps between logs never synchronise with the device. A non-finite loss is caught there.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch


class Meter:
    """Loss, grad norm, throughput and the share of time spent waiting for data."""

    def __init__(self):
        self.losses: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor] = []
        self.wait = 0.0
        self.since = time.perf_counter()
        self._last_loss: torch.Tensor | float = float("nan")

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Counts the time spent in the block as data wait."""
        start = time.perf_counter()
        yield
        self.wait += time.perf_counter() - start

    def record(self, *, loss: torch.Tensor | None, grad_norm: torch.Tensor) -> None:
        """A step's (device) loss and grad norm; `loss` None: this rank trained only blank batches in the step
        (ResumedEpoch)."""
        if loss is not None:
            self.losses.append(loss)
            self._last_loss = loss
        self.grad_norms.append(grad_norm)

    @property
    def last_loss(self) -> float:
        """The latest step's loss (waits for the GPU)."""
        return float(self._last_loss)

    def check_finite(self, step: int) -> None:
        """Raise FloatingPointError when a loss since the last flush is not finite (waits for the GPU): before a
        checkpoint is written, so that no checkpoint holds weights a NaN reached."""
        if self.losses and not bool(torch.isfinite(torch.stack(self.losses)).all()):
            raise FloatingPointError(f"non-finite flow-matching loss before step {step}: "
                                     f"{[float(x) for x in self.losses]}")

    def flush(self, *, samples_per_step: int, tokens_per_sample: int, step: int) -> dict[str, float]:
        """The means and rates since the last flush (the steps of every rank: `samples_per_step`)."""
        self.check_finite(step)
        loss = float(torch.stack(self.losses).float().mean()) if self.losses else float("nan")
        grad_norm = float(torch.stack(self.grad_norms).float().mean())
        elapsed = max(time.perf_counter() - self.since, 1e-9)  # after the reads: the steps' GPU work is done
        steps = len(self.grad_norms)
        out = {"loss": loss, "grad_norm": grad_norm,
               "steps_per_s": steps / elapsed, "samples_per_s": steps * samples_per_step / elapsed,
               "image_tokens_per_s": steps * samples_per_step * tokens_per_sample / elapsed,
               "data_wait": self.wait / elapsed}
        self.losses, self.grad_norms, self.wait, self.since = [], [], 0.0, time.perf_counter()
        return out
