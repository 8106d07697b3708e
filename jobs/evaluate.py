"""Measure a checkpoint on fixed prompts and seeds: FID, CLIP score, the demo's prompt adherence.

    python jobs/evaluate.py --run-id 3f2a... --prompt-file demo/data/heldout.txt --width 64 --height 64
    python jobs/evaluate.py --checkpoint ckpt/ --prompt-file prompts.txt --count 32 --width 512 --height 512 \
        --reference s3://bucket/reference-images/ --inception pt_inception-2015-12-05-6726825d.pth \
        --clip-model openai/clip-vit-base-patch32
    python jobs/evaluate.py --checkpoint ckpt/ --prompt-file demo/data/heldout.txt \
        --sweep-cfg 1 2 3 4 --sweep-uncond-tread 0 0.25 0.5 --sweep-metric adherence_color

Draws every prompt with every seed and measures the images: `fid` against --reference (Inception-v3 weights
from --inception), `clip_score` with --clip-model, and `adherence_color` / `adherence_shape` (chance 1/6 and
1/3) when every prompt is a demo caption. The metrics go to MLflow (the training run given by --run-id, else an
`evaluate` run); the images, grid.png (rows = prompts) and evaluation.json to --out. A sweep evaluates every
(CFG, unconditional TREAD) point, logs each, and writes the best one into the checkpoint as its sampling
defaults. See docs/evaluation.md and pipelines/eval/evaluate.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipelines.eval.evaluate import EvaluateConfig  # noqa: E402
from pipelines.cli import add_shared_flags, config_from_flags, job_main, seeds_from_flags  # noqa: E402


def parse_args(argv: list[str] | None = None) -> EvaluateConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="TOML file (or a JSON object) with EvaluateConfig fields; flags override it")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="checkpoint directory: path or s3:// URI")
    src.add_argument("--run-id", help="MLflow training run: evaluates its hdm.checkpoint and logs into it")
    ap.add_argument("--prompt-file", help="prompts, one per line (e.g. the demo data's heldout.txt)")
    ap.add_argument("--seed", type=int, action="append", dest="seeds", metavar="SEED",
                    help="a seed (repeatable); with --count, the first of COUNT consecutive seeds")
    ap.add_argument("--count", type=int, help="draw seeds SEED, SEED+1, ..., SEED+COUNT-1 (default 0..7)")
    ap.add_argument("--width", type=int, help="px, a multiple of 16 (default 64)")
    ap.add_argument("--height", type=int, help="px, a multiple of 16 (default 64)")
    ap.add_argument("--steps", type=int, help="Euler steps (default 16)")
    ap.add_argument("--cfg", type=float, help="classifier-free guidance scale (default 3.0)")
    ap.add_argument("--uncond-tread", type=float, help="TREAD rate of the unconditional branch (default 0: unrouted)")
    ap.add_argument("--batch-size", type=int, help="seeds of one prompt per denoiser batch (default 8)")
    ap.add_argument("--device", help="e.g. cuda, cpu (default: cuda when available)")
    ap.add_argument("--out", help="output directory (default ./evaluation)")
    m = ap.add_argument_group("metrics (see docs/evaluation.md)")
    m.add_argument("--reference", help="folder of reference images for FID, local or s3:// (default: no FID)")
    m.add_argument("--inception",
                   help="Inception-v3 weights for FID: .pth / .safetensors file, s3://, or hub id owner/repo[/file]")
    m.add_argument("--inception-variant", choices=["fid", "torchvision"],
                   help="fid: pytorch-fid's pt_inception file (default); torchvision: inception_v3_google")
    m.add_argument("--clip-model", help="transformers CLIP model for the CLIP score: hub id or folder")
    m.add_argument("--adherence", action=argparse.BooleanOptionalAction,
                   help="the demo's colour/shape detector (default: on when every prompt is a demo caption)")
    s = ap.add_argument_group("guidance sweep (one point at --cfg / --uncond-tread without these)")
    s.add_argument("--sweep-cfg", type=float, nargs="+", metavar="CFG", help="CFG scales to try (>= 1)")
    s.add_argument("--sweep-uncond-tread", type=float, nargs="+", metavar="RATE",
                   help="unconditional TREAD rates to try, in [0, 1)")
    s.add_argument("--sweep-metric", help="the metric that picks the best point (default adherence_color)")
    s.add_argument("--no-write-defaults", dest="sweep_write_defaults", action="store_false", default=None,
                   help="do not write the best point into the checkpoint as its sampling defaults")
    add_shared_flags(ap)
    args = vars(ap.parse_args(argv))
    args["seeds"] = seeds_from_flags(ap, args["seeds"], args.pop("count"))
    sweep = {k: args.pop(f"sweep_{k}") for k in ("cfg", "uncond_tread", "metric", "write_defaults")}
    if sweep["cfg"] or sweep["uncond_tread"]:
        args["sweep"] = {k: v for k, v in sweep.items() if v is not None}
    elif any(v is not None for v in sweep.values()):
        ap.error("--sweep-metric and --no-write-defaults need --sweep-cfg or --sweep-uncond-tread")
    return config_from_flags(EvaluateConfig, args, parser=ap)


def main(argv: list[str] | None = None) -> int:
    def run(config: EvaluateConfig):
        from pipelines.eval.evaluate import run_evaluation

        return run_evaluation(config)

    return job_main("evaluate", lambda: parse_args(argv), run, refusals=(FileNotFoundError, LookupError, ValueError),
                    init_ray=False)


if __name__ == "__main__":
    sys.exit(main())
