"""The shared `main` of the jobs in jobs/: parse and validate, run, map refusals to exit codes.

Exit codes: 0 done; 2 invalid configuration (nothing ran); 3 refused by the job (a clear reason on
stderr, nothing lost: e.g. a manifest mismatch or a missing previous stage).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

Config = TypeVar("Config", bound=BaseModel)

EXIT_INVALID = 2
EXIT_REFUSED = 3


def job_main(name: str, parse: Callable[[], Config], run: Callable[[Config], Any], *,
             refusals: tuple[type[Exception], ...] = (), init_ray: bool = True) -> int:
    """Run one job: `parse()` the config, `ray.init()` (the job's cluster) when asked, `run(config)`,
    print the `format()` of the summary it returns."""
    try:
        config = parse()
    except ValidationError as e:
        print(f"{name}: invalid configuration:\n{e}", file=sys.stderr)
        return EXIT_INVALID
    if init_ray:
        import ray

        ray.init()
    try:
        summary = run(config)
    except refusals as e:
        print(f"{name} refused: {e}", file=sys.stderr)
        return EXIT_REFUSED
    print(summary.format(), flush=True)
    return 0
