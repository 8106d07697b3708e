"""Download a URL list into image shards with img2dataset (the pipeline's ingest stage).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/ingest.py --url-list urls.parquet --output s3://bucket/shards

The shards (img2dataset `parquet` or `webdataset` output) are the input of jobs/precompute_latents.py and
jobs/train_vae.py. Flags override the optional --config TOML (same field names as IngestConfig).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipelines.cli import config_from_flags, job_main  # noqa: E402
from pipelines.data.ingest import IngestConfig  # noqa: E402


def parse_args(argv: list[str] | None = None) -> IngestConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="TOML file (or a JSON object) with IngestConfig fields; flags override it")
    ap.add_argument("--url-list", help="url list file or folder (parquet, csv, jsonl, tsv, txt), local or s3://")
    ap.add_argument("--output", help="shard folder, local or s3://")
    ap.add_argument("--input-format", help="parquet (default), csv, jsonl, tsv or txt")
    ap.add_argument("--url-col", help="column of URLs (default url)")
    ap.add_argument("--caption-col", help="column of captions (default caption)")
    ap.add_argument("--output-format", help="parquet (default) or webdataset")
    ap.add_argument("--image-size", type=int, help="resize so the long side is at most this (default: keep as is)")
    ap.add_argument("--processes", type=int, help="download processes (default 1)")
    ap.add_argument("--threads", type=int, help="download threads per process (default 16)")
    ap.add_argument("--timeout", type=int, help="seconds per URL (default 10)")
    ap.add_argument("--retries", type=int, help="retries per URL (default 0)")
    return config_from_flags(IngestConfig, vars(ap.parse_args(argv)), parser=ap)


def main(argv: list[str] | None = None) -> int:
    def run(config: IngestConfig):
        from pipelines.data.ingest import run_ingest

        return run_ingest(config)

    return job_main("ingest", lambda: parse_args(argv), run, refusals=(FileNotFoundError,), init_ray=False)


if __name__ == "__main__":
    sys.exit(main())
