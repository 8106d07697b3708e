"""A training checkpoint in the original release's layouts (jobs/export.py): the single fp16 file or the
diffusers folder, for the original's scripts, its diffusers pipeline and ComfyUI's HDM node."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import model_validator

from hdm_model import checkpoint
from pipelines.config import S3Options, StrictModel, TrackingOptions
from pipelines.eval.sampling import checkpoint_of_run
from pipelines.storage import download


class ExportConfig(StrictModel):
    checkpoint: str | None = None  # checkpoint directory: local path or s3:// URI
    run_id: str | None = None  # MLflow run whose `hdm.checkpoint` tag names the checkpoint
    layout: Literal["file", "diffusers"] = "file"
    output: str  # local path: a .safetensors file, or a folder for the diffusers layout
    ema: bool = True  # the EMA weights where the checkpoint has them
    vae: bool = True  # ship the checkpoint's VAE
    tracking: TrackingOptions = TrackingOptions()
    s3: S3Options = S3Options()

    @model_validator(mode="after")
    def _one_source(self) -> ExportConfig:
        if bool(self.checkpoint) == bool(self.run_id):
            raise ValueError("give exactly one of checkpoint, run_id")
        return self


def export(config: ExportConfig):
    """Copy the checkpoint (s3:// or an MLflow run's) locally, write it in `config.layout`; the summary."""
    from hdm_model.release import export_checkpoint

    uri = config.checkpoint or checkpoint_of_run(config)
    with tempfile.TemporaryDirectory(prefix="hdm-export-") as scratch:  # copies of s3:// inputs
        directory = download(uri, Path(scratch), config.s3, files=checkpoint.SAMPLING_FILES,
                             optional=checkpoint.SAMPLING_OPTIONAL)
        meta = checkpoint.read_meta(directory)
        if config.vae and not meta.vae:
            raise ValueError(f"{uri}: its config.json names no VAE; pass --no-vae to export without one")
        copy = lambda ref: download(ref, Path(scratch), config.s3) if ref else None  # noqa: E731
        summary = export_checkpoint(directory, config.output, layout=config.layout, ema=config.ema,
                                    vae=copy(meta.vae) if config.vae else None,
                                    text_encoder=copy(meta.text_encoder) if config.layout == "diffusers" else None,
                                    max_length=meta.max_length)
    summary.source = uri if not config.run_id else f"{uri} (MLflow run {config.run_id})"
    return summary
