"""The shared `main` of the jobs in jobs/: parse and validate, check, run, map refusals to exit codes.

Exit codes: 0 done; 2 invalid configuration or a failed precheck (nothing ran, no Ray started); 3 refused by
the job (a clear reason on stderr, nothing lost: e.g. a manifest mismatch or a missing previous stage); 4 the
MLflow tracking server could not be reached (the DAG runner: nothing was submitted, or the stage that was
running keeps running).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from pipelines.config import ConfigError, describe_errors
from pipelines.prechecks import PrecheckFailed
from pipelines.secrets import environment_secrets, redact_text
from pipelines.storage import RelativePathInJob

Config = TypeVar("Config", bound=BaseModel)

EXIT_INVALID = 2
EXIT_REFUSED = 3
EXIT_TRACKING = 4


def job_main(name: str, parse: Callable[[], Config], run: Callable[[Config], Any], *,
             refusals: tuple[type[Exception], ...] = (), init_ray: bool = True,
             precheck: Callable[[Config], None] | None = None) -> int:
    """Run one job: `parse()` the config, `precheck(config)` (pipelines/prechecks.py: what can be checked
    without a cluster or a model), `ray.init()` (the job's cluster) when asked, `run(config)`, print the
    `format()` of the summary it returns. Everything the job prints passes `redacted_output`."""
    with redacted_output():
        try:
            config = parse()
        except ConfigError as e:
            print("\n".join(f"{name}: {line}" for line in e.lines), file=sys.stderr)
            return EXIT_INVALID
        except ValidationError as e:  # a config built without config_from_flags
            print("\n".join(f"{name}: {line}" for line in describe_errors(e)), file=sys.stderr)
            return EXIT_INVALID
        if precheck is not None:
            try:
                precheck(config)
            except (PrecheckFailed, RelativePathInJob) as e:
                print(f"{name}: {e}", file=sys.stderr)
                return EXIT_INVALID
        if init_ray:
            from pipelines.cluster import connect

            connect()
        from pipelines.tracking import Terminated, TrackingUnavailable

        try:
            summary = run(config)
        except RelativePathInJob as e:
            print(f"{name}: {e}", file=sys.stderr)
            return EXIT_INVALID
        except refusals as e:
            print(f"{name} refused: {e}", file=sys.stderr)
            return EXIT_REFUSED
        except Terminated:  # raise_on_sigterm (`ray job stop`): a job's run is marked KILLED on the way out
            print(f"{name}: stopped (SIGTERM); its MLflow run is marked KILLED", file=sys.stderr, flush=True)
            return 128 + signal.SIGTERM
        except TrackingUnavailable as e:  # the server stayed away longer than the tracking calls wait
            print(f"{name}: {e}", file=sys.stderr, flush=True)
            return EXIT_TRACKING
        print(summary.format(), flush=True)
        return 0


class RedactingWriter:
    """A text stream that writes each line to `stream` through `pipelines.secrets.redact_text`. A line is held
    back until it is complete (or flushed), so that a credential is not split between two writes; everything
    else (fileno, isatty, encoding) is the wrapped stream's. Bytes written to `.buffer` or to the file
    descriptor itself (C extensions) pass unredacted."""

    def __init__(self, stream, secrets: set[str]):
        self.stream, self.secrets = stream, secrets
        self._pending, self._lock = "", threading.Lock()  # Ray's log thread writes beside the main thread

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._pending = (self._pending + text).split("\n")
            for line in lines:
                self.stream.write(redact_text(line, self.secrets) + "\n")
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self.stream.write(redact_text(self._pending, self.secrets))
                self._pending = ""
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextmanager
def redacted_output() -> Iterator[None]:
    """sys.stdout and sys.stderr through RedactingWriter while inside: a job's driver output is Ray's job
    log, which the dashboard and `ray job logs` show to anyone who can reach them. The secrets are those of
    this process's environment (pipelines/secrets.py), read once."""
    secrets = environment_secrets()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingWriter(sys.stdout, secrets), RedactingWriter(sys.stderr, secrets)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = saved


# Flags named after nested config fields: every job's tracking and s3 flags mean the same thing.
SHARED_FLAGS = {"mlflow_uri": "tracking.uri", "experiment": "tracking.experiment",
                "parent_run_id": "tracking.parent_run_id", "s3_endpoint": "s3.endpoint_url", "s3_profile": "s3.profile"}


def add_shared_flags(ap: argparse.ArgumentParser, *, tracking: bool = True, runs: bool = True) -> None:
    """The flags SHARED_FLAGS maps, spelled alike by every job: s3 always, the MLflow URI with `tracking`,
    and the experiment and parent run too with `runs` (jobs that log runs of their own)."""
    if tracking:
        ap.add_argument("--mlflow-uri",
                        help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite under ~/.hdm)")
        if runs:
            ap.add_argument("--experiment", help="MLflow experiment (default hdm)")
            ap.add_argument("--parent-run-id", help="the pipeline's MLflow run, when a DAG runs this job")
    ap.add_argument("--s3-endpoint", help="S3 endpoint for s3:// URIs, e.g. http://127.0.0.1:9000")
    ap.add_argument("--s3-profile", help="AWS profile for s3:// URIs")


def config_from_flags(model: type[Config], args: dict[str, Any], renames: dict[str, str] | None = None, *,
                      parser: argparse.ArgumentParser | None = None) -> Config:
    """A job's validated config: its `--config` (TOML path or JSON object), then the other flags on top,
    renamed to their (dotted) fields by SHARED_FLAGS and `renames`; flags left out (None) are ignored. Invalid,
    it raises ConfigError naming the flags as typed (`parser` spells those whose dest differs, e.g. --prompt)."""
    from pipelines.config import load_config

    names = {**SHARED_FLAGS, **(renames or {})}
    args = dict(args)
    path = args.pop("config")
    try:
        return load_config(model, path, {names.get(k, k): v for k, v in args.items()})
    except ValidationError as e:  # the flags' names, not pydantic's field dump
        spelled = {a.dest: max(a.option_strings, key=len) for a in (parser._actions if parser else ())
                   if a.option_strings}
        flags = {names.get(dest, dest): spelled.get(dest, "--" + dest.replace("_", "-")) for dest in args}
        typed = {names.get(dest, dest) for dest, value in args.items() if value is not None}
        source = None if path is None or str(path).lstrip().startswith("{") else f"--config {path}"
        raise ConfigError(describe_errors(e, flags=flags, typed=typed if path else None, source=source)) from None


def seeds_from_flags(ap: argparse.ArgumentParser, seeds: list[int] | None, count: int | None) -> list[int] | None:
    """`--seed S --count N` -> S..S+N-1 (S default 0); `--seed` repeated -> those seeds; neither -> None."""
    if count is None:
        return seeds
    if seeds and len(seeds) > 1:
        ap.error("--count takes one start --seed")
    start = seeds[0] if seeds else 0
    return list(range(start, start + count))
