"""Prompt adherence of a training stage on the demo's held-out prompts.

    python jobs/evaluate.py --run-id 3f2a... --prompt-file demo/data/heldout.txt --width 64 --height 64
    python jobs/evaluate.py --checkpoint runs/train-64/checkpoint_000001 --prompt-file demo/data/heldout.txt

Draws every prompt with every seed, detects each image's shape color (and shape) and scores it against
the prompt: `adherence_color` (chance 1/6) and `adherence_shape` (chance 1/3) go to MLflow (the training
run given by --run-id, else an `evaluate` run), the grid (rows = prompts) and adherence.json to --out.
See pipelines/eval/adherence.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipelines.eval.adherence import EvaluateConfig  # noqa: E402
from pipelines.cli import add_shared_flags, config_from_flags, job_main, seeds_from_flags  # noqa: E402


def parse_args(argv: list[str] | None = None) -> EvaluateConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="TOML file (or a JSON object) with EvaluateConfig fields; flags override it")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="checkpoint directory: path or s3:// URI")
    src.add_argument("--run-id", help="MLflow training run: evaluates its hdm.checkpoint and logs into it")
    ap.add_argument("--prompt-file", help="demo captions, one per line (the demo data's heldout.txt)")
    ap.add_argument("--seed", type=int, action="append", dest="seeds", metavar="SEED",
                    help="a seed (repeatable); with --count, the first of COUNT consecutive seeds")
    ap.add_argument("--count", type=int, help="draw seeds SEED, SEED+1, ..., SEED+COUNT-1 (default 0..7)")
    ap.add_argument("--width", type=int, help="px, a multiple of 16 (default 64)")
    ap.add_argument("--height", type=int, help="px, a multiple of 16 (default 64)")
    ap.add_argument("--steps", type=int, help="Euler steps (default 16)")
    ap.add_argument("--cfg", type=float, help="classifier-free guidance scale (default 3.0)")
    ap.add_argument("--batch-size", type=int, help="seeds of one prompt per denoiser batch (default 8)")
    ap.add_argument("--device", help="e.g. cuda, cpu (default: cuda when available)")
    ap.add_argument("--out", help="output directory (default ./evaluation)")
    add_shared_flags(ap)
    args = vars(ap.parse_args(argv))
    args["seeds"] = seeds_from_flags(ap, args["seeds"], args.pop("count"))
    return config_from_flags(EvaluateConfig, args)


def main(argv: list[str] | None = None) -> int:
    def run(config: EvaluateConfig):
        from pipelines.eval.adherence import run_evaluation

        return run_evaluation(config)

    return job_main("evaluate", lambda: parse_args(argv), run, refusals=(FileNotFoundError, LookupError, ValueError),
                    init_ray=False)


if __name__ == "__main__":
    sys.exit(main())
