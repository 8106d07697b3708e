"""Fault injection for the chaos suite (`make chaos`, docs/faults.md): inert unless HDM_FAULTS is set.

HDM_FAULTS is a JSON object {point: spec}. The code calls `inject(point, keys)` where a fault can happen (after
decode, before a VAE batch, after a part file is written, in a training step); when `point` is configured and
one of `keys` matches, the fault fires. What firing does is named by the point's last part:

    *.kill    SIGKILL this process (a worker that dies: a decoder crash, the kernel's OOM killer)
    *.raise   RuntimeError("injected fault <point>")
    *.oom     torch.OutOfMemoryError (MemoryError where torch is not imported)

spec: a list of keys (fires when any of `keys` is in it; [] or "*" fire on every call), or an object
{"keys": [...] (default every call), "times": N, "state": "/dir"}: fires at most N times across all
processes (one file per firing in `state`, claimed atomically). HDM_FAULTS holds no secret and travels in a
job's runtime env to every Ray worker.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

ENV = "HDM_FAULTS"


@lru_cache(maxsize=4)
def _parse(text: str) -> dict[str, dict[str, Any]]:
    """{point: {"keys": set | None, "times": int | None, "state": str | None}} of an HDM_FAULTS value."""
    specs = {}
    for point, spec in json.loads(text).items():
        if not isinstance(spec, dict):
            spec = {"keys": spec}
        keys = spec.get("keys", "*")
        specs[point] = {"keys": None if keys in ("*", [], None) else {str(k) for k in keys},
                        "times": spec.get("times"), "state": spec.get("state")}
    return specs


def inject(point: str, keys: Iterable[str] = ()) -> None:
    """Fire the fault configured for `point` when one of `keys` matches; return at once otherwise."""
    text = os.environ.get(ENV)
    if not text:
        return
    spec = _parse(text).get(point)
    if spec is None:
        return
    wanted = spec["keys"]
    hit = None if wanted is None else next((k for k in keys if str(k) in wanted), None)
    if wanted is not None and hit is None:
        return
    if spec["times"] is not None and not _claim(point, hit, spec):
        return
    _fire(point, hit)


def _claim(point: str, key: str | None, spec: dict[str, Any]) -> bool:
    """Take one of the point's `times` firings (files 0..times-1 under `state`, created exclusively)."""
    state = Path(spec["state"] or "/tmp/hdm-faults")
    state.mkdir(parents=True, exist_ok=True)
    for n in range(int(spec["times"])):
        try:
            fd = os.open(state / f"{point}.{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.write(fd, f"{os.getpid()} {key or ''}\n".encode())
        os.close(fd)
        return True
    return False


def _fire(point: str, key: str | None) -> None:
    action = point.rsplit(".", 1)[-1]
    where = f"injected fault {point}" + (f" at {key}" if key else "")
    print(f"HDM_FAULTS: {where}", file=sys.stderr, flush=True)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "oom":
        torch = sys.modules.get("torch")
        raise (torch.OutOfMemoryError if torch is not None else MemoryError)(where)
    raise RuntimeError(where)
