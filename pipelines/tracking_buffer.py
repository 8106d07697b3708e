"""What keeps training going while MLflow is away: a bounded buffer of metric points (and tags) that a
background thread sends in order, retrying with backoff, and the retry loop the driver's calls share.

A point keeps the timestamp it was made with, so a batch sent again (the answer lost, the server back) is the
same row: MLflow's store has (run, key, timestamp, step, value) as the metric's primary key and skips a row it
already holds. Points are sent oldest first and a batch leaves the buffer only once the server took it, so what
a run's history holds is always every point up to some moment.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

CAPACITY = 200_000  # metric points held while the server is away; then the oldest are dropped (and counted)
BATCH, TAGS = 1000, 100  # MLflow's log_batch takes at most 1000 entities (metrics and tags), 100 of them tags
FIRST_WAIT_S, MAX_WAIT_S = 1.0, 30.0  # backoff between attempts while the server does not answer


def is_permanent(error: Exception) -> bool:
    """An error no retry cures: the server answered with a 4xx (a bad request, a run that does not exist).
    A refused connection, a timeout or a 5xx is worth another try."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and 400 <= error.get_http_status_code() < 500


def retry(call: Callable[[], Any], *, patience_s: float, what: str, unavailable: Callable[[str], Exception]) -> Any:
    """`call()`'s result, tried again with backoff for up to `patience_s` while it fails transiently; then
    `unavailable(message)` is raised (a permanent error is raised at once)."""
    deadline, wait = time.monotonic() + patience_s, FIRST_WAIT_S
    while True:
        try:
            return call()
        except Exception as error:
            if is_permanent(error):
                raise
            if time.monotonic() + wait > deadline:
                raise unavailable(f"{what} failed for {patience_s:.0f} s: {error}") from error
        time.sleep(wait)
        wait = min(2 * wait, MAX_WAIT_S)


class MetricBuffer:
    """Metric points and tags for one run, sent by a daemon thread through `send(metrics, tags)` (one
    log_batch). `skip_through()`, when given, is asked once before the first send (retried like a send):
    points at or below the step it returns are already in the run's history and are not sent again."""

    def __init__(self, send: Callable[[list, list], None], *, skip_through: Callable[[], int | None] | None = None,
                 capacity: int = CAPACITY, name: str = "mlflow-sender"):
        self.send, self.skip_through, self.capacity = send, skip_through, capacity
        self.points: deque = deque()
        self.tags: dict[str, str] = {}
        self.inflight: tuple[list, dict[str, str]] | None = None
        self.dropped = self.skipped = 0
        self.last_error: str | None = None
        self.resumed_after: int | None = None  # the step skip_through returned, once asked
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def add(self, points: Iterable[Any] = (), tags: Mapping[str, str] | None = None) -> None:
        """Queue metric points (mlflow.entities.Metric) and tags; never blocks on the server."""
        with self.changed:
            self.points.extend(points)
            self.tags.update(tags or {})
            overflow = len(self.points) - self.capacity
            for _ in range(max(overflow, 0)):
                self.points.popleft()
            self.dropped += max(overflow, 0)
            self.changed.notify_all()

    @property
    def pending(self) -> int:
        """Points and tags not yet taken by the server."""
        with self.changed:
            held = self.inflight is not None and len(self.inflight[0]) + len(self.inflight[1])
            return len(self.points) + len(self.tags) + int(held or 0)

    def flush(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for everything queued to be sent; the number of points and tags left."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            self.changed.notify_all()
            while self.pending and time.monotonic() < deadline:
                self.changed.wait(timeout=min(0.2, max(deadline - time.monotonic(), 0.0)))
        return self.pending

    def _run(self) -> None:
        wait = FIRST_WAIT_S
        while True:
            batch = self._next_batch()
            try:
                self._deliver(batch)
                wait = FIRST_WAIT_S
            except Exception as error:  # the server away: keep the batch, try again later
                self.last_error = f"{type(error).__name__}: {error}"[:500]
                if is_permanent(error):  # a batch the server refuses would block every later one
                    with self.changed:
                        self.dropped += len(batch[0])
                        self.inflight = None
                    continue
                time.sleep(wait)
                wait = min(2 * wait, MAX_WAIT_S)

    def _next_batch(self) -> tuple[list, dict[str, str]]:
        """The batch in flight (a failed one is sent again), else the oldest points and every pending tag."""
        with self.changed:
            while self.inflight is None and not self.points and not self.tags:
                self.changed.wait()
            if self.inflight is None:
                tags = dict(list(self.tags.items())[:TAGS])
                for key in tags:
                    del self.tags[key]
                points = [self.points.popleft() for _ in range(min(BATCH - len(tags), len(self.points)))]
                self.inflight = (points, tags)
            return self.inflight

    def _deliver(self, batch: tuple[list, dict[str, str]]) -> None:
        if self.skip_through is not None and self.resumed_after is None:
            self.resumed_after = self.skip_through()
            if self.resumed_after is None:
                self.resumed_after = -1
        points, tags = batch
        fresh = [p for p in points if p.step > self.resumed_after] if self.skip_through else points
        if fresh or tags:
            self.send(fresh, [(k, v) for k, v in tags.items()])
        with self.changed:
            self.skipped += len(points) - len(fresh)
            self.inflight = None
            self.changed.notify_all()
