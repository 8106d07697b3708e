"""What every job's config is made of: the strict base model, S3 and MLflow options, the TOML/flags loader.

Each job's own config lives beside its code (pipelines/data/config.py, pipelines/train/config.py,
pipelines/eval/, pipelines/dag/spec.py): one pydantic model per job, validated at the entry point (extra
fields are errors); nothing below the entry point sees a raw dict. No torch here: Ray Data's workers import
configs, and torch would cost each of them seconds of CPU.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

# hdm_model.vae.DEFAULT_VAE, not imported from there: that would import torch into every process that reads a
# config, Ray Data's read and write workers included (2.5 s of CPU each, taken from the encoders on a small node)
DEFAULT_VAE = "KBlueLeaf/EQ-SDXL-VAE"

Model = TypeVar("Model", bound=BaseModel)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class S3Options(StrictModel):
    """How to reach object storage for `s3://` URIs (credentials: the usual AWS environment or a profile)."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for a local server
    profile: str | None = None
    region: str | None = None


def load_config(model: type[Model], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Model:
    """A validated config from an optional TOML file with `overrides` (None values ignored) on top.

    `path` may also be the config itself as a JSON object (text starting with "{"): that is how the
    pipeline DAG hands a stage its wired config on the command line. Override keys may be dotted
    ("caption.mode") to reach nested sections.
    """
    data: dict[str, Any] = {}
    if isinstance(path, str) and path.lstrip().startswith("{"):
        data = json.loads(path)
    elif path is not None:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return model.model_validate(data)


class ConfigError(ValueError):
    """A config that did not validate, as one line per error (`lines`): what is wrong, where it was given."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def describe_errors(error: ValidationError, *, flags: dict[str, str] | None = None, typed: set[str] | None = None,
                    source: str | None = None) -> list[str]:
    """One line per error of `error`, e.g. "--res 100: must be a multiple of 16 px" or "--storage is required",
    without pydantic's input dumps and documentation links. `flags`: dotted field -> the command-line flag that
    sets it; `typed`: the fields given as flags (None: all of them), the others came from `source` (the
    --config file) and are named as its fields. A missing field names its flag, and the file's field too."""
    lines = []
    for e in error.errors(include_url=False):
        field = ".".join(str(part) for part in e["loc"])
        message = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        in_file = f"{field} in {source}" if field and source else field
        flag = (flags or {}).get(field)
        if e["type"] == "missing":
            lines.append(f"{flag} is required" + (f" (or {in_file})" if source else "") if flag else
                         f"{in_file} is required")
            continue
        flag = flag if typed is None or field in typed else None
        where = flag or in_file
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown setting (a typo?)")
        elif not where:
            lines.append(message)
        elif flag and isinstance(e.get("input"), (str, int, float)):
            lines.append(f"{flag} {e['input']}: {message}")
        else:
            lines.append(f"{where}: {message}")
    return lines


class TrackingOptions(StrictModel):
    """MLflow: `uri`, else $MLFLOW_TRACKING_URI, else a sqlite file under ~/.hdm (no server needed)."""

    uri: str | None = None
    experiment: str = "hdm"
    run_name: str | None = None  # default: the stage name
    parent_run_id: str | None = None  # the pipeline's run, when a DAG runs this stage
    stage_key: str | None = None  # finds the run again on restart; default: derived from the output URI

    def resolved_uri(self) -> str:
        import os

        if self.uri or os.environ.get("MLFLOW_TRACKING_URI"):
            return self.uri or os.environ["MLFLOW_TRACKING_URI"]
        home = Path.home() / ".hdm"
        home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{home / 'mlflow.db'}"


def check_uri(value: str) -> str:
    """A local path, a file:// or an s3:// URI, trailing slash dropped; other schemes are refused."""
    if not value.strip():
        raise ValueError("must not be empty")
    if "://" in value and not value.startswith(("s3://", "file://")):
        raise ValueError(f"only local paths, file:// and s3:// URIs are supported, got {value!r}")
    return value.rstrip("/") if value not in ("/", "s3://") else value
