"""Configs of the training jobs: a progressive-resolution training stage (the HDM recipe per resolution) and
EQ-VAE fine-tuning."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipelines.config import S3Options, StrictModel, TrackingOptions, check_uri


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
    whole_image_every: int = Field(0, ge=0)  # every Nth step trains on whole image_size images instead of crops
                                             # (as many as fit the crops' pixels); 0: never
    train: Literal["both", "encoder", "decoder"] = "both"  # decoder-only training is not EQ-VAE (spec)
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1)  # per worker
    shuffle_buffer: int = Field(256, ge=0)  # rows each worker shuffles its batches from, every epoch; 0: input order
    lr: float = Field(2e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(0.1, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)  # the held-out metrics and the saved VAE use the moving
                                                      # average of the weights; None: the last weights
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
        return check_uri(value)

    @model_validator(mode="after")
    def _sizes(self) -> VAETrainConfig:
        if self.image_size is not None and self.image_size < self.crop_size:
            raise ValueError(f"image_size ({self.image_size}) must be at least crop_size ({self.crop_size})")
        if self.whole_image_every and (self.image_size or self.crop_size) <= self.crop_size:
            raise ValueError(f"whole_image_every needs an image_size above crop_size ({self.crop_size}): the whole "
                             f"images are the crops otherwise")
        return self


# The HDM recipe per resolution (hdm_spec 5.2 and 10; where report and code disagree, the code's values,
# which made the released weights: stage 4 keeps TREAD 0.5 and 256 text tokens, lr 0.05). `checkpointing` is
# ours: the least recomputation whose saved activations for the recipe's batch fit an 80 GiB GPU with 10%
# headroom (benchmarks/activation_memory.py, docs/performance.md); 512 px takes "mlp", as "outer" fits its
# batch of 64 with no room to spare.
RECIPE: dict[int, dict[str, Any]] = {
    256: dict(base_lr=0.5, betas=(0.9, 0.98), weight_decay=0.02, grad_clip=3.0, batch_size=128, grad_accum=4,
              tread_rate=0.5, ctx_length=256, checkpointing="outer"),
    512: dict(base_lr=0.1, betas=(0.9, 0.995), weight_decay=0.005, grad_clip=1.0, batch_size=64, grad_accum=2,
              tread_rate=0.5, ctx_length=256, checkpointing="mlp"),
    768: dict(base_lr=0.05, betas=(0.9, 0.995), weight_decay=0.002, grad_clip=1.0, batch_size=64, grad_accum=2,
              tread_rate=0.5, ctx_length=256, checkpointing="full"),
    1024: dict(base_lr=0.05, betas=(0.9, 0.995), weight_decay=0.002, grad_clip=1.0, batch_size=32, grad_accum=2,
               tread_rate=0.5, ctx_length=256, checkpointing="full"),
}


def recipe_for(res: int) -> dict[str, Any]:
    """The recipe row of the largest recipe resolution <= res (256's row below 256)."""
    rows = [r for r in sorted(RECIPE) if r <= res] or [min(RECIPE)]
    return dict(RECIPE[rows[-1]])


class SampleGridOptions(StrictModel):
    """Sample grids logged during training: fixed prompts x fixed seeds."""

    prompts: list[str] = Field(default_factory=lambda: ["1girl, solo, masterpiece", "a red circle on a blue background"])
    seeds: list[int] = Field(default_factory=lambda: [0, 1])
    negative_prompt: str = ""
    steps: int = Field(16, ge=1)
    cfg_scale: float = Field(3.0, ge=1.0)
    every: int = Field(1000, ge=1)  # optimizer steps; and always at the end


class DDPOptions(StrictModel):
    """torch DistributedDataParallel's options, for stages with several workers."""

    gradient_as_bucket_view: bool = True  # gradients live in the all-reduce buckets: no copy, less memory
    static_graph: bool = False  # the same parameters get gradients every step (true of the XUT with TREAD)
    bucket_cap_mb: float = Field(25.0, gt=0)  # all-reduce bucket size (torch's default)


class TrainStageConfig(StrictModel):
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
    checkpointing: Literal["none", "outer", "mlp", "full"]  # activations recomputed in backward (XUTConfig)
    compile: Literal["auto", "off", "blocks", "full"] = "auto"  # torch.compile; auto: blocks on CUDA, off on CPU
    attn_kernel: Literal["sdpa", "math"] = "sdpa"
    text_attn: Literal["sdpa", "eager", "flex_attention"] = "sdpa"  # the text encoder's attention (masked)
    ddp: DDPOptions = DDPOptions()
    caption_dropout: float = Field(0.1, ge=0, le=1)  # share of captions replaced by the null prompt (CFG)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    cache_latents_below_mb: float = Field(1024, ge=0)  # smaller latent sets are held in Ray's object store
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(10, ge=1)
    sample: SampleGridOptions = SampleGridOptions()
    workers: int | None = Field(None, ge=1)  # default: 4 when the cluster has GPUs, else 2
    use_gpu: bool | None = None  # default: when the cluster has GPUs
    torch_threads: int | None = Field(None, ge=1)  # CPU workers; None: (node's cores - 1) / workers on it
    max_failures: int = Field(2, ge=0)
    # pack: workers on as few nodes as fit them; spread: over nodes where they fit; strict_spread: one per node
    placement: Literal["pack", "spread", "strict_spread"] = "pack"
    seed: int = 20090220  # HDM's seed
    tracking: TrackingOptions = TrackingOptions()
    s3: S3Options = S3Options()

    @model_validator(mode="before")
    @classmethod
    def _recipe_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and "grad_checkpointing" in data:  # the boolean of configs written before
            data = dict(data)
            legacy = data.pop("grad_checkpointing")
            data.setdefault("checkpointing", "full" if legacy else "none")
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

    def derive(self, **overrides: Any) -> TrainStageConfig:
        """The next stage: this one's fields plus explicit overrides (by derive_params' rule)."""
        return TrainStageConfig.model_validate(derive_params(self.model_dump(), overrides))


def derive_params(parent: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The params of a stage derived from another's (TrainStageConfig fields): recipe fields that hold the
    parent resolution's recipe value are dropped, so they follow the new resolution's recipe (RECIPE);
    values set on purpose carry over; the run name does not; `overrides` go on top. The rule of
    TrainStageConfig.derive and of a DAG stage's `extends` (pipelines/dag/spec.py)."""
    recipe = recipe_for(parent["res"]) if isinstance(parent.get("res"), int) else {}
    kept = {k: v for k, v in parent.items() if k != "name" and not (k in recipe and _same(v, recipe[k]))}
    return {**kept, **overrides}


def _same(a: Any, b: Any) -> bool:
    return list(a) == list(b) if isinstance(a, (tuple, list)) else a == b
