"""Inputs that kill their worker: found out and turned into error rows, in a bounded number of retries.

Ray Data retries a map_batches task whose worker process died forever by default (Ray 2.60: tasks
max_retries=-1, ray/data/_internal/remote_fn.py; actor pools max_restarts=-1 and max_task_retries=-1,
ActorPoolMapOperator._apply_default_remote_args): measured, a batch whose worker is SIGKILLed on every try
was retried 46 times in 60 s as a task and 14 times as a pool actor, and never ended. One image that crashes
its decoder, or takes the worker's memory, would hang the job. The stages therefore keep a journal under
OUTPUT/_attempts/ (hidden from readers):

- a batch is marked before it is processed and unmarked after;
- a batch found marked was being processed when its worker died: this attempt processes its items one at a
  time, each marked with the number of attempts it has started;
- an item found marked `max_attempts` times is not processed again: it becomes an error row WORKER_CRASHED.

A batch with k such items then costs at most 1 + k * max_attempts worker deaths; `ray_retry_args` bounds
Ray's own retries by that (for up to MAX_KILLERS_PER_BATCH such items a batch), so nothing retries forever.
The job clears the journal when it starts (it holds the output's lease: no other job uses it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipelines.storage import exists, join, read_bytes, write_bytes_atomic

JOURNAL_DIR = "_attempts"
MAX_KILLERS_PER_BATCH = 4  # worker-killing inputs one batch can hold before Ray's retries run out


@dataclass(frozen=True)
class JournalSpec:
    """Where a job's stages keep their journal (picklable: Ray ships it to every task and actor)."""

    fs: Any
    root: str  # the job's output
    max_attempts: int = 2


def ray_retry_args(max_attempts: int, *, actor: bool) -> dict[str, int]:
    """map_batches' ray_remote_args that bound Ray's retries of a stage's tasks (enough for the journal to
    isolate MAX_KILLERS_PER_BATCH worker-killing inputs of a batch). An actor may restart any number of times:
    each restart follows the death of one of its tasks, whose retries are bounded (a bounded max_restarts
    would instead end a long job after a few worker-killing inputs in all)."""
    retries = 1 + max_attempts * MAX_KILLERS_PER_BATCH
    return {"max_restarts": -1, "max_task_retries": retries} if actor else {"max_retries": retries}


def clear(spec: JournalSpec) -> None:
    """Forget every mark (at the start of a job, which holds the output's lease)."""
    path = join(spec.root, JOURNAL_DIR)
    if exists(spec.fs, path):
        spec.fs.delete_dir(path)


def guarded(spec: JournalSpec | None, stage: str, items: list[dict],
            process: Callable[[list[dict]], list[dict]], *,
            crashed: Callable[[dict, str], list[dict]]) -> list[dict]:
    """`process(items)`, journalled: after a crash of this batch, item by item, and `crashed(item, detail)` (its
    error rows) for an item that killed its worker `max_attempts` times. Without a journal: `process(items)`."""
    if spec is None or not items:
        return process(items)
    batch = _mark_path(spec, stage, "batch", "\n".join(sorted(i["key"] for i in items)))
    if not exists(spec.fs, batch):
        write_bytes_atomic(spec.fs, batch, b"1")
        out = process(items)
        spec.fs.delete_file(batch)
        return out
    out, written_off = [], []
    for item in items:  # a previous attempt of this batch died: find the item that kills it
        rows = _one(spec, stage, item, process)
        if rows is None:
            written_off.append(item["key"])
            rows = crashed(item, f"its {stage} worker died on each of {spec.max_attempts} attempts")
        out.extend(rows)
    # the marks of written-off items stay until the batch is done: should the worker die on a later item, the
    # next attempt must not try them again
    for key in written_off:
        spec.fs.delete_file(_mark_path(spec, stage, "item", key))
    spec.fs.delete_file(batch)
    return out


def _one(spec: JournalSpec, stage: str, item: dict,
         process: Callable[[list[dict]], list[dict]]) -> list[dict] | None:
    """`process([item])` with the item marked while it runs; None for an item that has killed its worker on
    `max_attempts` attempts already."""
    mark = _mark_path(spec, stage, "item", item["key"])
    started = int(read_bytes(spec.fs, mark)) if exists(spec.fs, mark) else 0
    if started >= spec.max_attempts:
        return None
    write_bytes_atomic(spec.fs, mark, str(started + 1).encode())
    out = process([item])
    spec.fs.delete_file(mark)
    return out


def _mark_path(spec: JournalSpec, stage: str, kind: str, text: str) -> str:
    digest = hashlib.sha256(f"{stage}\n{text}".encode()).hexdigest()[:24]
    return join(spec.root, JOURNAL_DIR, f"{stage}-{kind}-{digest}")

