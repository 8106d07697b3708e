"""Job configs: one pydantic model per job, validated at the entry point (extra fields are errors).

A job reads an optional TOML file, then applies command-line overrides on top; nothing below the entry
point sees a raw dict.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


class VAETrainConfig(StrictModel):
    """jobs/train_vae.py: EQ-VAE fine-tuning (or training from scratch) on Ray Train."""

    input: str  # the same inputs as the precompute job
    output: str  # where the trained VAE is saved (save_pretrained layout), local or s3://
    input_format: Literal["auto", "parquet", "webdataset", "folder"] = "auto"
    vae: str = "madebyollin/sdxl-vae-fp16-fix"  # hub id or path to fine-tune, or a named config ("tiny", "small")
    crop_size: int = Field(256, ge=16)  # random square crops of the (resized, rescaled) images
    image_size: int | None = Field(None, ge=16)  # short side images are resized to first; None: crop_size
    min_scale: float = Field(1.0, gt=0, le=1)  # each sample is also shrunk by a random factor in [min_scale, 1]
                                               # before its crop (never below crop_size): one VAE for several scales
    train: Literal["both", "encoder", "decoder"] = "both"  # decoder-only training is not EQ-VAE (spec)
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1)  # per worker
    shuffle_buffer: int = Field(256, ge=0)  # rows each worker shuffles its batches from, every epoch; 0: input order
    lr: float = Field(2e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(0.1, gt=0)
    p_eq: float = Field(0.5, ge=0, le=1)  # probability that a batch gets the scale + rotation transform
    kl_weight: float = Field(1e-6, ge=0)
    pixel_loss: Literal["l1", "mse", "l1+mse"] = "l1"
    lpips_weight: float = Field(0.0, ge=0)  # needs pretrained VGG weights: off unless available
    adv_weight: float = Field(0.0, ge=0)
    eval_images: int = Field(16, ge=1)  # held out (by key hash), reconstruction and equivariance metrics
    stats_images: int = Field(256, ge=1)  # images encoded for the latent mean/std written into the config
    log_every: int = Field(10, ge=1)
    workers: int | None = Field(None, ge=1)  # default: 4 when the cluster has GPUs, else 2
    use_gpu: bool | None = None  # None: when the cluster has GPUs
    torch_threads: int | None = Field(None, ge=1)  # CPU workers; None: (node's cores - 1) / workers on it
    seed: int = 0
    max_pixels: int = Field(100_000_000, ge=1)
    tracking: TrackingOptions = TrackingOptions()
    s3: S3Options = S3Options()

    @field_validator("crop_size")
    @classmethod
    def _crop(cls, value: int) -> int:
        if value % 16:
            raise ValueError(f"crop_size must be a multiple of 16 px, got {value}")
        return value

    @field_validator("input", "output")
    @classmethod
    def _uri(cls, value: str) -> str:
        return PrecomputeConfig._uri(value)

    @model_validator(mode="after")
    def _sizes(self) -> VAETrainConfig:
        if self.image_size is not None and self.image_size < self.crop_size:
            raise ValueError(f"image_size ({self.image_size}) must be at least crop_size ({self.crop_size})")
        return self


# The HDM recipe per resolution (hdm_spec 5.2 and 10; where report and code disagree, the code's values,
# which made the released weights: stage 4 keeps TREAD 0.5 and 256 text tokens, lr 0.05).
RECIPE: dict[int, dict[str, Any]] = {
    256: dict(base_lr=0.5, betas=(0.9, 0.98), weight_decay=0.02, grad_clip=3.0, batch_size=128, grad_accum=4,
              tread_rate=0.5, ctx_length=256, grad_checkpointing=True),
    512: dict(base_lr=0.1, betas=(0.9, 0.995), weight_decay=0.005, grad_clip=1.0, batch_size=64, grad_accum=2,
              tread_rate=0.5, ctx_length=256, grad_checkpointing=True),
    768: dict(base_lr=0.05, betas=(0.9, 0.995), weight_decay=0.002, grad_clip=1.0, batch_size=64, grad_accum=2,
              tread_rate=0.5, ctx_length=256, grad_checkpointing=True),
    1024: dict(base_lr=0.05, betas=(0.9, 0.995), weight_decay=0.002, grad_clip=1.0, batch_size=32, grad_accum=2,
               tread_rate=0.5, ctx_length=256, grad_checkpointing=True),
}


def recipe_for(res: int) -> dict[str, Any]:
    """The recipe row of the largest recipe resolution <= res (256's row below 256)."""
    rows = [r for r in sorted(RECIPE) if r <= res] or [min(RECIPE)]
    return dict(RECIPE[rows[-1]])


class SampleOptions(StrictModel):
    """Sample grids logged during training: fixed prompts x fixed seeds."""

    prompts: list[str] = Field(default_factory=lambda: ["1girl, solo, masterpiece", "a red circle on a blue background"])
    seeds: list[int] = Field(default_factory=lambda: [0, 1])
    negative_prompt: str = ""
    steps: int = Field(16, ge=1)
    cfg_scale: float = Field(3.0, ge=1.0)
    every: int = Field(1000, ge=1)  # optimizer steps; and always at the end


class StageConfig(StrictModel):
    """jobs/train_stage.py: one progressive-resolution stage. Fields left out take the HDM recipe's value
    for the resolution (RECIPE); a later stage is an earlier one plus explicit overrides."""

    res: int
    latents: str  # latent dataset root (the precompute output); this stage reads LATENTS/res=RES
    storage: str  # checkpoints go to STORAGE/NAME (local or s3://)
    name: str | None = None  # run name; default "train-RES". The same name resumes the run.
    model: str = "xut-base"  # preset; ctx_dim follows the text encoder
    text_encoder: str = "Qwen/Qwen3-0.6B"
    vae: str | None = None  # for sample grids; default: the VAE named in the latents' manifest
    init_from: str = "auto"  # "auto" (previous resolution's final checkpoint via MLflow), "none", or a URI
    steps: int = Field(1000, ge=1)  # optimizer steps
    warmup_steps: int = Field(1000, ge=0)
    base_lr: float = Field(gt=0)
    betas: tuple[float, float]
    weight_decay: float = Field(ge=0)
    grad_clip: float = Field(gt=0)
    batch_size: int = Field(ge=1)  # per worker and micro-step
    shuffle_buffer: int = Field(1024, ge=0)  # rows each worker draws its batches from, reseeded every epoch; 0: off
    grad_accum: int = Field(ge=1)
    tread_rate: float = Field(ge=0, lt=1)
    ctx_length: int = Field(ge=1)  # text tokens (training pads every caption to this length)
    text_cache_size: int = Field(0, ge=0)  # captions whose text states are kept (LRU): for repeating captions
    grad_checkpointing: bool
    attn_kernel: Literal["sdpa", "math"] = "sdpa"
    caption_dropout: float = Field(0.1, ge=0, le=1)  # share of captions replaced by the null prompt (CFG)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    cache_latents_below_mb: float = Field(1024, ge=0)  # smaller latent sets are held in Ray's object store
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(10, ge=1)
    sample: SampleOptions = SampleOptions()
    workers: int | None = Field(None, ge=1)  # default: 4 when the cluster has GPUs, else 2
    use_gpu: bool | None = None  # default: when the cluster has GPUs
    torch_threads: int | None = Field(None, ge=1)  # CPU workers; None: (node's cores - 1) / workers on it
    max_failures: int = Field(2, ge=0)
    seed: int = 20090220  # HDM's seed
    tracking: TrackingOptions = TrackingOptions()
    s3: S3Options = S3Options()

    @model_validator(mode="before")
    @classmethod
    def _recipe_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("res"), int):
            data = {**recipe_for(data["res"]), **data}
        return data

    @field_validator("res")
    @classmethod
    def _res(cls, value: int) -> int:
        if value < 16 or value % 16:
            raise ValueError(f"res must be a multiple of 16 px, got {value}")
        return value

    @property
    def run_name(self) -> str:
        return self.name or f"train-{self.res}"

    def derive(self, **overrides: Any) -> StageConfig:
        """The next stage: this one's fields plus explicit overrides. Recipe fields that still hold this
        resolution's recipe value follow the new resolution's recipe; values set on purpose carry over."""
        data = self.model_dump()
        recipe = recipe_for(self.res)
        data = {k: v for k, v in data.items() if not (k in recipe and _same(v, recipe[k]))}
        return StageConfig.model_validate({**data, "name": None, **overrides})


def _same(a: Any, b: Any) -> bool:
    return list(a) == list(b) if isinstance(a, (tuple, list)) else a == b
