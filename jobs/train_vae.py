"""EQ-VAE: fine-tune a diffusers AutoencoderKL (hub id or path) or train a named small one from scratch,
on Ray Train, with the equivariance regulariser of EQ-VAE. The trained VAE, with its latent mean/std in
its config, is saved to --output (local or s3://): that URI is what the precompute stage consumes.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/train_vae.py --input IMAGES --output s3://bucket/vae --vae tiny --steps 300

Exit codes: 0 done; 2 invalid config; 4 MLflow unreachable for longer than the job waits; 143 stopped
(SIGTERM, `ray job stop`: its run marked KILLED).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipelines.cli import add_shared_flags, config_from_flags, job_main  # noqa: E402
from pipelines.tracking import raise_on_sigterm  # noqa: E402
from pipelines.train.config import VAETrainConfig


def parse_args(argv: list[str] | None = None) -> VAETrainConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="TOML file with VAETrainConfig fields; flags override it")
    ap.add_argument("--input", help="images, as for precompute_latents.py: local path or s3:// URI")
    ap.add_argument("--output", help="where the trained VAE is saved (save_pretrained layout)")
    ap.add_argument("--input-format", choices=["auto", "parquet", "webdataset", "folder"])
    ap.add_argument("--vae", help="hub id or path to fine-tune, or 'tiny' / 'small' to train from scratch")
    ap.add_argument("--crop-size", type=int, help="square training crops, px (multiple of 16)")
    ap.add_argument("--image-size", type=int,
                    help="short side images are resized to before cropping (default: crop size)")
    ap.add_argument("--min-scale", type=float, help="shrink each sample by a random factor in [MIN_SCALE, 1] first")
    ap.add_argument("--whole-image-every", type=int,
                    help="every Nth step trains on whole --image-size images instead of crops (default 0: never)")
    ap.add_argument("--train", choices=["both", "encoder", "decoder"], help="which parts train (default both)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-size", type=int, help="images per worker and step")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--weight-decay", type=float)
    ap.add_argument("--grad-clip", type=float)
    ap.add_argument("--ema-decay", type=float, help="save the moving average of the weights (e.g. 0.995)")
    ap.add_argument("--p-eq", type=float, help="probability of the equivariance transform per batch (0 = off)")
    ap.add_argument("--kl-weight", type=float)
    ap.add_argument("--pixel-loss", choices=["l1", "mse", "l1+mse"])
    ap.add_argument("--eval-images", type=int, help="held-out images for PSNR / equivariance error")
    ap.add_argument("--stats-images", type=int, help="images encoded for latents_mean / latents_std")
    ap.add_argument("--workers", type=int, help="Ray Train workers (DDP)")
    ap.add_argument("--torch-threads", type=int, help="per CPU worker (default: its share of the cores, less one)")
    ap.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--seed", type=int)
    add_shared_flags(ap)
    return config_from_flags(VAETrainConfig, vars(ap.parse_args(argv)), parser=ap)


def main(argv: list[str] | None = None) -> int:
    def run(config: VAETrainConfig):
        from pipelines.train.eqvae import run_vae_training

        raise_on_sigterm()  # `ray job stop`: the run is marked KILLED on the way out (after ray.init: it sets its own)
        return run_vae_training(config)

    return job_main("train_vae", lambda: parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
