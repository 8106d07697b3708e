"""Images -> Parquet latents at each resolution, as a Ray Data job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/precompute_latents.py --input INPUT --output OUTPUT --res 256 512

INPUT: img2dataset parquet or webdataset output, or a folder of images with optional .txt captions;
local path or s3://. Flags override the optional --config TOML (same field names as PrecomputeConfig).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipelines.cli import add_shared_flags, config_from_flags, job_main  # noqa: E402
from pipelines.data.config import PrecomputeConfig  # noqa: E402
from pipelines.data.latent_store import ManifestMismatch  # noqa: E402
from pipelines.lease import LeaseHeld  # noqa: E402
from pipelines.prechecks import check_input, check_model, check_output  # noqa: E402


def parse_args(argv: list[str] | None = None) -> PrecomputeConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="TOML file with PrecomputeConfig fields; flags override it")
    ap.add_argument("--input", help="images: local path or s3:// URI")
    ap.add_argument("--output", help="latent dataset: local path or s3:// URI")
    ap.add_argument("--input-format", choices=["auto", "parquet", "webdataset", "folder"], help="default: auto")
    ap.add_argument("--res", type=int, nargs="+", dest="resolutions", help="short sides in px, multiples of 16")
    ap.add_argument("--vae", help="diffusers AutoencoderKL hub id or path (default KBlueLeaf/EQ-SDXL-VAE)")
    ap.add_argument("--max-aspect", type=float, help="cap on long/short side; longer images are centre-cropped")
    ap.add_argument("--max-pixels", type=int, help="reject larger images as decompression bombs")
    ap.add_argument("--no-std", dest="store_std", action="store_const", const=False,
                    help="do not store the posterior std (training then uses the mean)")
    ap.add_argument("--batch-size", type=int, help="images per VAE batch")
    ap.add_argument("--encoders", type=int, help="VAE actors (default: one per GPU, or one per CPU without GPUs)")
    ap.add_argument("--gpus-per-encoder", type=float, help="default: 1 when the cluster has GPUs, else 0")
    ap.add_argument("--threads-per-encoder", type=int,
                    help="torch threads per CPU encoder (default: the cores the rest of the node leaves idle)")
    ap.add_argument("--rows-per-file", type=int)
    ap.add_argument("--limit", type=int, help="process at most this many inputs")
    ap.add_argument("--max-attempts", type=int,
                    help="times an input may kill its worker before it becomes a worker_crashed error row (default 2)")
    ap.add_argument("--caption-mode", choices=["keep", "model"], help="keep the input's captions or run a model")
    ap.add_argument("--caption-model", help="transformers image-to-text hub id or path")
    ap.add_argument("--caption-policy", choices=["replace", "append"])
    ap.add_argument("--caption-actors", type=int)
    ap.add_argument("--caption-gpus", type=float, help="GPUs per caption actor")
    ap.add_argument("--lease-ttl", type=float, dest="lease_ttl_s",
                    help="seconds after which a dead job's lease on the output is taken over (default 60)")
    ap.add_argument("--allow-code-change", action="store_const", const=True,
                    help="resume an output whose latents were made by another version of the latent code")
    ap.add_argument("--allow-input-change", action="store_const", const=True,
                    help="resume an output made from another input root")
    add_shared_flags(ap, tracking=False)
    return config_from_flags(PrecomputeConfig, vars(ap.parse_args(argv)), {
        "caption_mode": "caption.mode", "caption_model": "caption.model", "caption_policy": "caption.policy",
        "caption_actors": "caption.actors", "caption_gpus": "caption.gpus_per_actor"}, parser=ap)


def precheck(config: PrecomputeConfig) -> None:
    """Before Ray and the models: the input is there, the output writable, the VAE (and captioner) loadable."""
    check_input(config.input, config.s3)
    check_output(config.output, config.s3)
    check_model(config.vae, what="--vae")
    if config.caption.mode == "model":
        check_model(config.caption.model, what="--caption-model")


def main(argv: list[str] | None = None) -> int:
    def run(config: PrecomputeConfig):
        from pipelines.data.precompute import run_precompute

        return run_precompute(config)

    return job_main("precompute", lambda: parse_args(argv), run, precheck=precheck,
                    refusals=(ManifestMismatch, FileNotFoundError, LeaseHeld))


if __name__ == "__main__":
    sys.exit(main())
