"""Export a training checkpoint for the original HDM's tools: its single-file release or its diffusers folder.

    python jobs/export.py --checkpoint ckpt/ --layout file --output hdm-mine.safetensors
    python jobs/export.py --checkpoint s3://bucket/run/stage-512/final --layout diffusers --output hdm-mine/
    python jobs/export.py --run-id 3f2a... --mlflow-uri http://127.0.0.1:5000 --no-ema --output hdm.safetensors

The EMA weights are exported where the checkpoint has them (--no-ema: the trained ones); the checkpoint's
VAE goes with them (--no-vae: left out), and, in the diffusers layout, its text encoder. See docs/sampling.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pydantic import model_validator  # noqa: E402

from pipelines.cli import add_shared_flags, config_from_flags, job_main  # noqa: E402
from pipelines.config import S3Options, StrictModel, TrackingOptions


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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="TOML file with ExportConfig fields; flags override it")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="checkpoint directory (model.safetensors + config.json): path or s3:// URI")
    src.add_argument("--run-id", help="MLflow run id: exports the checkpoint named by its hdm.checkpoint tag")
    ap.add_argument("--layout", choices=["file", "diffusers"], help="single .safetensors (default) or diffusers folder")
    ap.add_argument("--output", help="where to write (a local path)")
    ap.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                    help="export the EMA weights where the checkpoint has them (default: yes)")
    ap.add_argument("--no-vae", dest="vae", action="store_const", const=False, help="leave the VAE out")
    add_shared_flags(ap, runs=False)  # --mlflow-uri: where --run-id is looked up
    return ap


def export(config: ExportConfig):
    from hdm_model.release import export_checkpoint
    from hdm_model import checkpoint
    from pipelines.eval.sampling import checkpoint_of_run
    from pipelines.storage import download

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


def main(argv: list[str] | None = None) -> int:
    return job_main("export", lambda: config_from_flags(ExportConfig, vars(build_parser().parse_args(argv))),
                    export, refusals=(FileNotFoundError, LookupError, ValueError), init_ray=False)


if __name__ == "__main__":
    sys.exit(main())
