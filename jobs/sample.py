"""Images from any training stage's checkpoint, an MLflow run, or the released HDM weights.

    python jobs/sample.py --checkpoint ckpt/ --prompt "1girl, solo" --seed 0 --seed 1 --grid
    python jobs/sample.py --checkpoint s3://bucket/run/stage-512/final --prompt-file prompts.txt --seed 10 --count 4
    python jobs/sample.py --run-id 3f2a... --mlflow-uri http://127.0.0.1:5000 --prompt "a cat"
    python jobs/sample.py --official hdm-xut-340M.safetensors --prompt "..." --width 768 --height 1024
    python jobs/sample.py --official HDM-xut-340M-anime/ --prompt "..."     # the released diffusers folder

Every prompt is drawn with every seed; each PNG holds its generation parameters (JSON) in its
`parameters` text chunk. Without --cfg / --uncond-tread, a checkpoint's sampling defaults (its sampling.json,
written by an evaluate job's guidance sweep) are used, else 3.0 / off. See docs/sampling.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipelines.cli import add_shared_flags, config_from_flags, job_main, seeds_from_flags  # noqa: E402
from pipelines.eval.sampling import SampleConfig  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="TOML file with SampleConfig fields; flags override it")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="checkpoint directory (model.safetensors + config.json): path or s3:// URI")
    src.add_argument("--run-id", help="MLflow run id: samples the checkpoint named by its hdm.checkpoint tag")
    src.add_argument("--official", help="released HDM .safetensors, or its diffusers folder (path or s3://); "
                     "the file's vae.* weights / the folder's vae/, text_encoder/ are used")
    ap.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT", help="a prompt (repeatable)")
    ap.add_argument("--prompt-file", help="a text file, one prompt per line (blank lines skipped)")
    ap.add_argument("--negative-prompt", help="the unconditional branch's prompt (default empty)")
    ap.add_argument("--width", type=int, help="px, a multiple of 16 (default 1024); any aspect ratio")
    ap.add_argument("--height", type=int, help="px, a multiple of 16 (default 1024)")
    ap.add_argument("--steps", type=int, help="Euler steps (default 24)")
    ap.add_argument("--cfg", type=float, help="classifier-free guidance scale, >= 1 (1 = no guidance; default: the "
                    "checkpoint's sampling defaults, sampling.json from an evaluate sweep, else 3.0)")
    ap.add_argument("--seed", type=int, action="append", dest="seeds", metavar="SEED",
                    help="a seed (repeatable); with --count, the first of COUNT consecutive seeds (default 0)")
    ap.add_argument("--count", type=int, help="draw seeds SEED, SEED+1, ..., SEED+COUNT-1")
    ap.add_argument("--zoom", type=float, help="camera zoom, > 1 zooms in (default 1)")
    ap.add_argument("--x-shift", type=float, help="camera shift right, in grid units (default 0; -1..1 typical)")
    ap.add_argument("--y-shift", type=float, help="camera shift down, in grid units (default 0)")
    ap.add_argument("--cond-tread", type=float, help="TREAD routing rate of the conditional pass, [0, 1) (default off)")
    ap.add_argument("--uncond-tread", type=float, help="TREAD rate of the unconditional pass, [0, 1): 0.5 = "
                    "auto-guidance, 0 = off (default: the checkpoint's sampling defaults, else off)")
    ap.add_argument("--batch-size", type=int, help="images per denoiser batch (default 1: bit-reproducible)")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on GPU, else float32")
    ap.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: cuda when available)")
    ap.add_argument("--text-encoder", help="text encoder hub id or path, instead of the checkpoint's")
    ap.add_argument("--vae", help="diffusers AutoencoderKL hub id or path, instead of the checkpoint's or file's")
    ap.add_argument("--out", help="output directory for the PNGs (default ./samples)")
    ap.add_argument("--grid", action="store_const", const=True,
                    help="also write grid.png: rows = prompts, columns = seeds")
    add_shared_flags(ap, runs=False)  # --mlflow-uri: where --run-id is looked up
    return ap


def parse_args(argv: list[str] | None = None) -> SampleConfig:
    ap = build_parser()
    args = vars(ap.parse_args(argv))
    prompt_file = args.pop("prompt_file")
    if prompt_file:
        lines = Path(prompt_file).read_text().splitlines()
        args["prompts"] = (args["prompts"] or []) + [line.strip() for line in lines if line.strip()]
    args["seeds"] = seeds_from_flags(ap, args["seeds"], args.pop("count"))
    return config_from_flags(SampleConfig, args, parser=ap)


def main(argv: list[str] | None = None) -> int:
    def run(config: SampleConfig):
        from pipelines.eval.sampling import run_sampling

        return run_sampling(config)

    return job_main("sample", lambda: parse_args(argv), run, refusals=(FileNotFoundError, LookupError, ValueError),
                    init_ray=False)


if __name__ == "__main__":
    sys.exit(main())
