"""Job configs: one pydantic model per job, validated at the entry point (extra fields are errors).

A job reads an optional TOML file, then applies command-line overrides on top; nothing below the entry
point sees a raw dict.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hdm_model.vae import DEFAULT_VAE

Model = TypeVar("Model", bound=BaseModel)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class S3Options(StrictModel):
    """How to reach object storage for `s3://` URIs (credentials: the usual AWS environment or a profile)."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for a local server
    profile: str | None = None
    region: str | None = None


class CaptionOptions(StrictModel):
    """`keep` uses the input's captions; `model` runs a transformers image-to-text model."""

    mode: Literal["keep", "model"] = "keep"
    model: str | None = None  # hub id or local path, for mode = "model"
    policy: Literal["replace", "append"] = "replace"  # what a generated caption does to an existing one
    max_new_tokens: int = Field(40, ge=1, le=512)
    actors: int = Field(1, ge=1)
    gpus_per_actor: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _model_given(self) -> CaptionOptions:
        if self.mode == "model" and not self.model:
            raise ValueError("caption mode 'model' needs caption.model (a hub id or a local path)")
        return self


class PrecomputeConfig(StrictModel):
    """jobs/precompute_latents.py: images -> Parquet latents at each resolution (design.md, Data contracts)."""

    input: str  # local folder or s3:// prefix
    output: str  # local folder or s3:// prefix
    input_format: Literal["auto", "parquet", "webdataset", "folder"] = "auto"
    resolutions: list[int] = Field(default_factory=lambda: [256], min_length=1)
    vae: str = DEFAULT_VAE  # hub id or local path
    max_aspect: float = Field(3.0, ge=1.0)  # long / short side; longer images are centre-cropped to it
    max_pixels: int = Field(100_000_000, ge=1)  # larger images are rejected as decompression bombs
    store_std: bool = True  # keep the posterior std to resample latents every epoch
    batch_size: int = Field(16, ge=1)  # images per VAE batch
    encoders: int = Field(1, ge=1)  # VAE actors
    gpus_per_encoder: float | None = Field(None, ge=0)  # None: 1 when the cluster has GPUs, else 0
    threads_per_encoder: int | None = Field(None, ge=1)  # torch threads on CPU; None: cores / encoders
    rows_per_file: int = Field(256, ge=1)
    limit: int | None = Field(None, ge=1)  # process at most this many inputs (after resume filtering)
    caption: CaptionOptions = CaptionOptions()
    s3: S3Options = S3Options()

    @field_validator("resolutions")
    @classmethod
    def _resolutions(cls, value: list[int]) -> list[int]:
        bad = [r for r in value if r < 16 or r % 16]
        if bad:
            raise ValueError(f"resolutions must be multiples of 16 px (>= 16), got {bad}")
        if len(set(value)) != len(value):
            raise ValueError(f"resolutions repeat: {value}")
        return sorted(value)

    @field_validator("input", "output")
    @classmethod
    def _uri(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        if "://" in value and not value.startswith(("s3://", "file://")):
            raise ValueError(f"only local paths, file:// and s3:// URIs are supported, got {value!r}")
        return value.rstrip("/") if value not in ("/", "s3://") else value


def load_config(model: type[Model], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Model:
    """A validated config from an optional TOML file with `overrides` (None values ignored) on top.

    Override keys may be dotted ("caption.mode") to reach nested sections.
    """
    data: dict[str, Any] = {}
    if path is not None:
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
