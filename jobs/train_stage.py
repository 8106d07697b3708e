"""One progressive-resolution training stage of the XUT denoiser on Ray Train.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/train_stage.py --res 512 --latents s3://bucket/latents --storage s3://bucket/runs

Fields left out take the HDM recipe's value for --res (pipelines/train/config.py RECIPE). --init-from auto (the
default) starts from the final weights of the latest run at the previous resolution of the same lineage
(MLflow; refused if that run failed or is unfinished), resolved once and reused on relaunch;
relaunching with the same --name resumes the stage from its last checkpoint.
Exit codes: 0 done; 2 invalid config; 3 refused; 4 MLflow unreachable for longer than the job waits (an outage
during training only delays its metrics); 143 stopped (SIGTERM, `ray job stop`: its run marked KILLED).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipelines.cli import add_shared_flags, config_from_flags, job_main  # noqa: E402
from pipelines.tracking import raise_on_sigterm  # noqa: E402
from pipelines.train.config import TrainStageConfig


def parse_args(argv: list[str] | None = None) -> TrainStageConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="TOML file with TrainStageConfig fields; flags override it")
    ap.add_argument("--res", type=int, help="training resolution, px")
    ap.add_argument("--latents", help="latent dataset root (precompute output), local or s3://")
    ap.add_argument("--storage", help="checkpoint root, local or s3://; the run lives in STORAGE/NAME")
    ap.add_argument("--name", help="run name (default train-RES); the same name resumes")
    ap.add_argument("--model", help="preset: tiny, xut-small, xut-base, xut-large")
    ap.add_argument("--text-encoder", help="transformers model id or path (default Qwen/Qwen3-0.6B)")
    ap.add_argument("--vae", help="VAE for sample grids (default: the latents' manifest)")
    ap.add_argument("--init-from", help="auto | none | checkpoint directory, s3:// URI or official .safetensors")
    ap.add_argument("--steps", type=int, help="optimizer steps")
    ap.add_argument("--warmup-steps", type=int)
    ap.add_argument("--base-lr", type=float, help="muP base lr (per tensor: base / fan_in)")
    ap.add_argument("--weight-decay", type=float)
    ap.add_argument("--grad-clip", type=float)
    ap.add_argument("--batch-size", type=int, help="per worker and micro-step")
    ap.add_argument("--grad-accum", type=int)
    ap.add_argument("--tread-rate", type=float, help="share of image tokens routed around the backbone")
    ap.add_argument("--ctx-length", type=int, help="text tokens per caption")
    ap.add_argument("--text-cache-size", type=int, help="distinct captions whose text states are kept (default 0)")
    ap.add_argument("--checkpointing", choices=["none", "outer", "mlp", "full"],
                    help="activations recomputed in backward (default: the recipe's for --res; docs/performance.md)")
    ap.add_argument("--compile", choices=["auto", "off", "blocks", "full"],
                    help="torch.compile of the denoiser and text encoder (default auto: blocks on GPU, off on CPU)")
    ap.add_argument("--text-attn", choices=["sdpa", "eager", "flex_attention"],
                    help="the text encoder's attention kernel (the padding mask is always applied)")
    ap.add_argument("--caption-dropout", type=float, help="share of captions replaced by the null prompt")
    ap.add_argument("--ema-decay", type=float)
    ap.add_argument("--checkpoint-every", type=int)
    ap.add_argument("--sample-every", type=int)
    ap.add_argument("--log-every", type=int)
    ap.add_argument("--workers", type=int, help="default 4 with GPUs, else 2")
    ap.add_argument("--torch-threads", type=int, help="per CPU worker (default: its share of the cores, less one)")
    ap.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--max-failures", type=int, help="worker failures to recover from")
    ap.add_argument("--placement", choices=["pack", "spread", "strict_spread"],
                    help="workers packed on few nodes (default), spread, or one per node (strict_spread)")
    ap.add_argument("--seed", type=int)
    add_shared_flags(ap)
    return config_from_flags(TrainStageConfig, vars(ap.parse_args(argv)), {"sample_every": "sample.every"}, parser=ap)


def main(argv: list[str] | None = None) -> int:
    def run(config: TrainStageConfig):
        from pipelines.train.stage import run_training_stage

        raise_on_sigterm()  # `ray job stop`: the run is marked KILLED on the way out (after ray.init: it sets its own)
        return run_training_stage(config)

    return job_main("train_stage", lambda: parse_args(argv), run,
                    refusals=(LookupError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
