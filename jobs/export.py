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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipelines.cli import add_shared_flags, config_from_flags, job_main  # noqa: E402
from pipelines.eval.export import ExportConfig, export  # noqa: E402


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


def main(argv: list[str] | None = None) -> int:
    def parse() -> ExportConfig:
        ap = build_parser()
        return config_from_flags(ExportConfig, vars(ap.parse_args(argv)), parser=ap)

    return job_main("export", parse, export, refusals=(FileNotFoundError, LookupError, ValueError), init_ray=False)


if __name__ == "__main__":
    sys.exit(main())
