"""jobs/sample.py's library side: find the weights (a checkpoint directory, local or s3://, an MLflow run's
final checkpoint, or a released HDM file), build an `HDMPipeline`, write PNGs with their parameters.

A checkpoint is read through hdm_model.checkpoint (its format's owner). The text-encoder and VAE ids it
records may be hub ids, local paths or s3:// URIs (copied locally first).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from pydantic import Field, field_validator, model_validator

from hdm_model import Camera, HDMPipeline, checkpoint, make_grid, save_png

from pipelines.config import S3Options, StrictModel, TrackingOptions
from pipelines.storage import download


class SampleConfig(StrictModel):
    """jobs/sample.py: images from exactly one of `checkpoint`, `run_id` or `official`."""

    checkpoint: str | None = None  # checkpoint directory: local path or s3:// URI
    run_id: str | None = None  # MLflow run whose `hdm.checkpoint` tag names the checkpoint
    official: str | None = None  # released HDM .safetensors or diffusers folder: local path or s3:// URI
    prompts: list[str] = Field(min_length=1)
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    steps: int = Field(24, ge=1)
    cfg: float | None = None  # None: the checkpoint's sampling defaults (sampling.json), else 3.0
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    zoom: float = Field(1.0, gt=0)
    x_shift: float = 0.0
    y_shift: float = 0.0
    cond_tread: float | None = Field(None, ge=0, lt=1)
    uncond_tread: float | None = Field(None, ge=0, lt=1)  # None: the checkpoint's sampling defaults, else unrouted
    batch_size: int = Field(1, ge=1)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None  # None: float16 on GPU, float32 on CPU
    device: str | None = None  # None: cuda when available, else cpu
    text_encoder: str | None = None  # overrides the checkpoint's (official: the folder's, else Qwen/Qwen3-0.6B)
    vae: str | None = None  # overrides the checkpoint's (official default: the file's own vae.* weights)
    out: str = "samples"  # local directory
    grid: bool = False  # also write grid.png: rows = prompts, columns = seeds
    tracking: TrackingOptions = TrackingOptions()
    s3: S3Options = S3Options()

    @model_validator(mode="after")
    def _one_source(self) -> SampleConfig:
        given = [name for name in ("checkpoint", "run_id", "official") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of checkpoint, run_id, official (got {given or 'none'})")
        return self

    @field_validator("width", "height")
    @classmethod
    def _size(cls, value: int) -> int:
        if value < 16 or value % 16:
            raise ValueError(f"width and height must be multiples of 16 px, got {value}")
        return value


@dataclass
class SampleSummary:
    source: str
    guidance: str = ""  # the CFG scale and unconditional TREAD rate used, and where they came from
    images: list[str] = field(default_factory=list)
    grid: str | None = None

    def format(self) -> str:
        lines = [f"sample: {len(self.images)} images from {self.source}", f"  {self.guidance}",
                 *(f"  {p}" for p in self.images)]
        return "\n".join(lines + ([f"  grid: {self.grid}"] if self.grid else []))


def run_sampling(config: SampleConfig) -> SampleSummary:
    """Load the weights, draw every prompt with every seed, write `<out>/<i>-p<prompt>-s<seed>.png`."""
    with tempfile.TemporaryDirectory(prefix="hdm-sample-") as scratch:  # copies of s3:// inputs
        pipe = load_pipeline(config, Path(scratch))
        images = pipe(config.prompts, negative_prompt=config.negative_prompt, width=config.width,
                      height=config.height, steps=config.steps, cfg_scale=config.cfg, seeds=config.seeds,
                      camera=Camera(zoom=config.zoom, x_shift=config.x_shift, y_shift=config.y_shift),
                      cond_tread_rate=config.cond_tread, uncond_tread_rate=config.uncond_tread,
                      batch_size=config.batch_size)
    summary = SampleSummary(source=pipe.source, guidance=describe_guidance(pipe, config))
    summary.images, summary.grid = write_images(images, Path(config.out), prompts=config.prompts, seeds=config.seeds,
                                                grid=config.grid)
    return summary


def write_images(images: list[Image.Image], out: Path, *, prompts: list[str], seeds: list[int],
                 grid: bool) -> tuple[list[str], str | None]:
    """Every image (prompt-major, as HDMPipeline draws them) as `<out>/<i>-p<prompt>-s<seed>.png` with its
    generation parameters, and with `grid` grid.png (rows = prompts, columns = seeds, every image's
    parameters): (the image paths, the grid's path or None)."""
    n = len(seeds)
    paths = [str(save_png(image, out / f"{i:04d}-p{i // n:02d}-s{seeds[i % n]}.png")) for i, image in enumerate(images)]
    if not grid:
        return paths, None
    parameters = {"layout": "rows = prompts, columns = seeds", "prompts": prompts, "seeds": seeds,
                  "images": [json.loads(image.info["parameters"]) for image in images]}
    return paths, str(save_png(make_grid(images, cols=n), out / "grid.png", parameters=parameters))


def describe_guidance(pipe: HDMPipeline, config: SampleConfig) -> str:
    """e.g. "cfg 2.5, uncond TREAD 0.3 (checkpoint defaults: <source>)": the values a call with the config's
    flags samples with (HDMPipeline.guidance), and which of them are the checkpoint's defaults."""
    cfg, rate = pipe.guidance(config.cfg, config.uncond_tread)
    text = f"cfg {cfg:g}, uncond TREAD {f'{rate:g}' if rate else 'off'}"
    defaults = pipe.sampling_defaults
    if defaults is None:
        return text
    used = [name for name, flag in (("cfg", config.cfg), ("uncond TREAD", config.uncond_tread)) if flag is None]
    if not used:
        return text + " (flags; the checkpoint's defaults not used)"
    which = "checkpoint defaults" if len(used) == 2 else f"{used[0]} from the checkpoint defaults"
    return text + f" ({which}: {defaults.source or checkpoint.SAMPLING})"


def load_pipeline(config: SampleConfig, scratch: Path) -> HDMPipeline:
    """The HDMPipeline of the config's source; s3:// inputs are copied under `scratch`."""
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, config.dtype) if config.dtype else None
    text_encoder = download(config.text_encoder, scratch, config.s3) if config.text_encoder else None
    vae = download(config.vae, scratch, config.s3) if config.vae else None
    if config.official:
        pipe = HDMPipeline.from_official(download(config.official, scratch, config.s3), device=device, dtype=dtype,
                                         text_encoder=text_encoder, vae=vae)
        pipe.source = config.official
        return pipe
    uri = config.checkpoint or checkpoint_of_run(config)
    directory = Path(download(uri, scratch, config.s3, files=checkpoint.SAMPLING_FILES,
                              optional=checkpoint.SAMPLING_OPTIONAL))
    meta = checkpoint.read_meta(directory)
    pipe = HDMPipeline.from_checkpoint(
        directory, device=device, dtype=dtype,
        text_encoder=text_encoder or (download(meta.text_encoder, scratch, config.s3) if meta.text_encoder else None),
        vae=vae or (download(meta.vae, scratch, config.s3) if meta.vae else None))
    pipe.source = uri if not config.run_id else f"{uri} (MLflow run {config.run_id})"
    return pipe


def checkpoint_of_run(config: SampleConfig) -> str:
    from pipelines.tracking import checkpoint_uri_of_run

    tracking_uri = config.tracking.resolved_uri()
    if not tracking_uri:
        raise ValueError("run_id needs an MLflow tracking URI (--mlflow-uri or $MLFLOW_TRACKING_URI)")
    return checkpoint_uri_of_run(tracking_uri, config.run_id)
