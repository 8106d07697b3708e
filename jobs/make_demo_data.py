"""The demo's synthetic captioned images: coloured shapes on plain backgrounds, plus the URL list that
img2dataset downloads (file:// URLs) and the held-out prompts the evaluation draws.

    python jobs/make_demo_data.py --out demo/data --count 2000 --size 64
    img2dataset --url_list demo/data/urls.parquet --input_format parquet --url_col url --caption_col caption \\
        --output_format parquet --output_folder demo/images --encode_format png --encode_quality 9 --resize_mode no

Flags override the optional --config TOML or JSON object (DemoDataConfig fields). See pipelines/data/demo_data.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipelines.cli import config_from_flags, job_main  # noqa: E402
from pipelines.data.demo_data import DemoDataConfig, write_demo_data  # noqa: E402


def parse_args(argv: list[str] | None = None) -> DemoDataConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="TOML file (or a JSON object) with DemoDataConfig fields; flags override it")
    ap.add_argument("--out", help="output directory (images/, urls.parquet, heldout.txt)")
    ap.add_argument("--count", type=int, help="number of images (default 2000)")
    ap.add_argument("--size", type=int, help="image side, px (default 64)")
    ap.add_argument("--seed", type=int, help="the same seed writes the same files (default 0)")
    ap.add_argument("--holdout", type=int,
                    help="(shape, background) combinations held out of training per color (default 1)")
    ap.add_argument("--spread", type=float,
                    help="how far from the centre a shape may sit: 0 centred, 1 anywhere in the image (default 0.3)")
    return config_from_flags(DemoDataConfig, vars(ap.parse_args(argv)), parser=ap)


def main(argv: list[str] | None = None) -> int:
    def run(config: DemoDataConfig):
        return write_demo_data(config.out, count=config.count, size=config.size, seed=config.seed,
                               holdout=config.holdout, spread=config.spread)

    return job_main("make_demo_data", lambda: parse_args(argv), run, refusals=(ValueError,), init_ray=False)


if __name__ == "__main__":
    sys.exit(main())
