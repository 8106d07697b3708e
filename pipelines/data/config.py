"""Configs of the data jobs: precompute_latents (images -> Parquet latents) and its captioning options."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipelines.config import DEFAULT_VAE, S3Options, StrictModel, check_uri


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
    encoders: int | None = Field(None, ge=1)  # VAE actors; None: one per GPU, or one per CPU without GPUs
    gpus_per_encoder: float | None = Field(None, ge=0)  # None: 1 when the cluster has GPUs, else 0
    threads_per_encoder: int | None = Field(None, ge=1)  # torch threads on CPU; None: the idle cores (CoreShare)
    rows_per_file: int = Field(256, ge=1)
    max_attempts: int = Field(2, ge=1)  # deaths of its worker an input may cause before it is an error row
    limit: int | None = Field(None, ge=1)  # process at most this many inputs (after resume filtering)
    lease_ttl_s: float = Field(60.0, gt=0)  # the output's lease expires this long after its holder stops renewing
    allow_code_change: bool = False  # resume an output made by other latent code (manifest code_sha256)
    allow_input_change: bool = False  # resume an output made from another input root (manifest input)
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
        return check_uri(value)
