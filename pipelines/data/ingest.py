"""URL list -> image shards with img2dataset, the first stage of a pipeline (jobs/ingest.py).

img2dataset does the downloading (http(s)://, and file:// for data already on disk); its `parquet` or
`webdataset` output is what the precompute and EQ-VAE jobs read. Images are kept as downloaded (no
resize, no re-encoding) by default: the precompute job does the resizing and cropping per resolution.
Failed URLs stay in the shards with their `status` and error message, and are counted here.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator

from pipelines.config import StrictModel, check_uri
from pipelines.storage import list_files, read_bytes, resolve


class IngestConfig(StrictModel):
    """jobs/ingest.py: one img2dataset download."""

    url_list: str  # a file or folder of url lists (parquet/csv/jsonl/tsv/txt), local or s3://
    output: str  # shard folder, local or s3://
    input_format: Literal["parquet", "csv", "jsonl", "tsv", "txt"] = "parquet"
    url_col: str = "url"
    caption_col: str | None = "caption"
    output_format: Literal["parquet", "webdataset"] = "parquet"
    image_size: int | None = Field(None, ge=16)  # None: keep images as they are (no resize, no re-encode)
    encode_format: Literal["jpg", "png", "webp"] = "jpg"  # only used when image_size re-encodes
    processes: int = Field(1, ge=1)
    threads: int = Field(16, ge=1)
    timeout: int = Field(10, ge=1)  # seconds per URL
    retries: int = Field(0, ge=0)
    samples_per_shard: int = Field(10_000, ge=1)
    min_image_size: int = Field(0, ge=0)

    @field_validator("url_list", "output")
    @classmethod
    def _uri(cls, value: str) -> str:
        return check_uri(value)


@dataclass
class IngestSummary:
    output: str
    successes: int
    failures: int
    seconds: float

    def format(self) -> str:
        total = self.successes + self.failures
        return (f"ingest: {self.successes}/{total} images downloaded to {self.output} "
                f"({self.failures} failed) in {self.seconds:.1f} s")


def run_ingest(config: IngestConfig) -> IngestSummary:
    from img2dataset import download

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # else albumentations asks PyPI on every import
    start = time.monotonic()
    keep = config.image_size is None
    download(url_list=config.url_list, output_folder=config.output, input_format=config.input_format,
             url_col=config.url_col, caption_col=config.caption_col, output_format=config.output_format,
             image_size=config.image_size or 256, resize_mode="no" if keep else "keep_ratio",
             resize_only_if_bigger=True, disable_all_reencoding=keep, encode_format=config.encode_format,
             encode_quality=9 if config.encode_format == "png" else 95, processes_count=config.processes,
             thread_count=config.threads, timeout=config.timeout, retries=config.retries,
             number_sample_per_shard=config.samples_per_shard, min_image_size=config.min_image_size,
             enable_wandb=False, distributor="multiprocessing")
    successes = failures = 0
    fs, root = resolve(config.output)
    for path in (p for p in list_files(fs, root) if p.endswith("_stats.json")):
        stats = json.loads(read_bytes(fs, path))
        successes += stats.get("successes", 0)
        failures += stats.get("failed_to_download", 0) + stats.get("failed_to_resize", 0)
    return IngestSummary(config.output, successes, failures, time.monotonic() - start)
