"""jobs/sample.py's library side: find the weights (a checkpoint directory, local or s3://, an MLflow run's
final checkpoint, or a released HDM file), build an `HDMPipeline`, write PNGs with their parameters.

Checkpoint contract (what a training stage writes; hdm_model.pipeline reads it): a directory with
`model.safetensors` and `config.json` = {"model", "text_encoder": {"id", "max_length"}, "vae", "stage"}.
Text-encoder and VAE ids there may be hub ids, local paths or s3:// URIs (copied locally first).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

import pyarrow.fs as pafs
import torch
from pydantic import Field, field_validator, model_validator

from hdm_model import Camera, HDMPipeline, make_grid, save_png
from hdm_model.pipeline import EMA_WEIGHTS_NAME

from pipelines.config import S3Options, StrictModel, TrackingOptions
from pipelines.storage import exists, join, resolve

CHECKPOINT_FILES = ("config.json", "model.safetensors")  # what sampling needs of a checkpoint (not the optimizer)
OPTIONAL_FILES = (EMA_WEIGHTS_NAME,)  # copied too where the checkpoint has them


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
    cfg: float = 3.0
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    zoom: float = Field(1.0, gt=0)
    x_shift: float = 0.0
    y_shift: float = 0.0
    cond_tread: float | None = Field(None, ge=0, lt=1)
    uncond_tread: float | None = Field(None, ge=0, lt=1)
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
    images: list[str] = field(default_factory=list)
    grid: str | None = None

    def format(self) -> str:
        lines = [f"sample: {len(self.images)} images from {self.source}", *(f"  {p}" for p in self.images)]
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
    out, n = Path(config.out), len(config.seeds)
    summary = SampleSummary(source=pipe.source)
    for i, image in enumerate(images):
        path = out / f"{i:04d}-p{i // n:02d}-s{config.seeds[i % n]}.png"
        summary.images.append(str(save_png(image, path)))
    if config.grid:
        parameters = {"layout": "rows = prompts, columns = seeds", "prompts": config.prompts, "seeds": config.seeds,
                      "images": [json.loads(image.info["parameters"]) for image in images]}
        summary.grid = str(save_png(make_grid(images, cols=n), out / "grid.png", parameters=parameters))
    return summary


def load_pipeline(config: SampleConfig, scratch: Path) -> HDMPipeline:
    """The HDMPipeline of the config's source; s3:// inputs are copied under `scratch`."""
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, config.dtype) if config.dtype else None
    text_encoder = local_copy(config.text_encoder, scratch, config.s3) if config.text_encoder else None
    vae = local_copy(config.vae, scratch, config.s3) if config.vae else None
    if config.official:
        pipe = HDMPipeline.from_official(local_copy(config.official, scratch, config.s3), device=device, dtype=dtype,
                                         text_encoder=text_encoder, vae=vae)
        pipe.source = config.official
        return pipe
    uri = config.checkpoint or checkpoint_of_run(config)
    directory = Path(local_copy(uri, scratch, config.s3, files=CHECKPOINT_FILES, optional=OPTIONAL_FILES))
    meta = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
    te_id, vae_id = (meta.get("text_encoder") or {}).get("id"), meta.get("vae")
    pipe = HDMPipeline.from_checkpoint(
        directory, device=device, dtype=dtype,
        text_encoder=text_encoder or (local_copy(te_id, scratch, config.s3) if te_id else None),
        vae=vae or (local_copy(vae_id, scratch, config.s3) if vae_id else None))
    pipe.source = uri if not config.run_id else f"{uri} (MLflow run {config.run_id})"
    return pipe


def checkpoint_of_run(config: SampleConfig) -> str:
    from pipelines.tracking import checkpoint_uri_of_run

    tracking_uri = config.tracking.resolved_uri()
    if not tracking_uri:
        raise ValueError("run_id needs an MLflow tracking URI (--mlflow-uri or $MLFLOW_TRACKING_URI)")
    return checkpoint_uri_of_run(tracking_uri, config.run_id)


def local_copy(uri: str, scratch: Path, s3: S3Options, *, files: tuple[str, ...] | None = None,
               optional: tuple[str, ...] = ()) -> str:
    """`uri` itself when it is not s3:// (a local path, file:// stripped, or a hub id); else a copy under
    `scratch` of the object, of the whole prefix, or of just `files` (and those of `optional` that exist)
    under the prefix."""
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if not uri.startswith("s3://"):
        return uri
    fs, path = resolve(uri, s3)
    if not exists(fs, path):
        raise FileNotFoundError(f"nothing at {uri}")
    dest = scratch / f"{sum(1 for _ in scratch.iterdir())}-{PurePosixPath(path).name}"
    local = pafs.LocalFileSystem()
    if files is None:
        pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=local)
        return str(dest)
    dest.mkdir(parents=True)
    for name in files:
        if not exists(fs, join(path, name)):
            raise FileNotFoundError(f"{uri} is not a checkpoint: no {name}")
    for name in (*files, *(n for n in optional if exists(fs, join(path, n)))):
        pafs.copy_files(join(path, name), str(dest / name), source_filesystem=fs, destination_filesystem=local)
    return str(dest)
