"""URL list -> image shards with img2dataset, the first stage of a pipeline (jobs/ingest.py).

img2dataset does the downloading (http(s)://, and file:// for data already on disk); its `parquet` or
`webdataset` output is what the precompute and EQ-VAE jobs read. Images are kept as downloaded (no
resize, no re-encoding) by default: the precompute job does the resizing and cropping per resolution.
Failed URLs stay in the shards with their `status` and error message, and are counted here.

Progress: img2dataset downloads in its own processes and tells only as each shard ends (its
`<shard>_stats.json`); a driver thread counts the URLs of finished shards, of the URL list's total (a parquet
list's footer; unknown for the text formats), so a one-shard download shows 0/N, then N/N.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from pipelines import progress
from pipelines.config import StrictModel, check_uri
from pipelines.storage import list_files, read_bytes, resolve

STATS_SUFFIX = "_stats.json"  # img2dataset's record of a finished shard: count, successes, failures


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
    with progress.Reporter(shard_progress(config), unit="url"):
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
    for path in (p for p in list_files(fs, root) if p.endswith(STATS_SUFFIX)):
        stats = json.loads(read_bytes(fs, path))
        successes += stats.get("successes", 0)
        failures += stats.get("failed_to_download", 0) + stats.get("failed_to_resize", 0)
    return IngestSummary(config.output, successes, failures, time.monotonic() - start)


def shard_progress(config: IngestConfig) -> Callable[[], tuple[int, int | None]]:
    """The driver's poll for progress.Reporter: (URLs of the shards img2dataset has finished, URLs listed).
    The URL count is read once, on the first poll, in the reporter's thread."""
    fs, root = resolve(config.output)
    total = functools.cache(lambda: url_count(config))

    def poll() -> tuple[int, int | None]:
        done = 0
        for path in (p for p in list_files(fs, root) if p.endswith(STATS_SUFFIX)):
            try:
                done += json.loads(read_bytes(fs, path)).get("count", 0)
            except ValueError:  # being written right now: counted at the next poll
                continue
        return done, total()
    return poll


def url_count(config: IngestConfig) -> int | None:
    """URLs in the list by its parquet footers (a file, or every .parquet file of a folder); None for the text
    formats (counting them would read the whole list)."""
    if config.input_format != "parquet":
        return None
    fs, root = resolve(config.url_list)
    files = [root] if fs.get_file_info(root).type == pafs.FileType.File else [
        p for p in list_files(fs, root) if p.endswith(".parquet")]
    count = 0
    for path in files:
        with fs.open_input_file(path) as f:
            count += pq.ParquetFile(f).metadata.num_rows
    return count
