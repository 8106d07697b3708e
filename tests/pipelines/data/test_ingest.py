"""The ingest job (jobs/ingest.py, img2dataset) on a file:// URL list: its shards, its summary and the progress
lines its driver prints as img2dataset finishes shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines import progress

ROOT = Path(__file__).resolve().parents[3]


def test_job_downloads_shards_and_reports_urls_of_finished_shards(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    urls = []
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(images / f"{i}.png")
        urls.append({"url": (images / f"{i}.png").as_uri(), "caption": f"red {i}"})
    urls.append({"url": (images / "missing.png").as_uri(), "caption": "never there"})
    pq.write_table(pa.Table.from_pylist(urls), tmp_path / "urls.parquet")
    out = tmp_path / "shards"
    result = subprocess.run([sys.executable, "jobs/ingest.py", "--url-list", str(tmp_path / "urls.parquet"),
                             "--output", str(out), "--threads", "2", "--config", json.dumps({"samples_per_shard": 2})],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"ingest: 4/5 images downloaded to {out} (1 failed)" in result.stdout
    assert len(list(out.glob("*_stats.json"))) == 3  # 5 URLs, 2 a shard

    lines = [p for p in map(progress.parse, result.stdout.splitlines()) if p is not None]
    assert (lines[0].done, lines[-1].done) == (0, 5), result.stdout  # before any shard; every URL at the end
    assert {(p.total, p.unit) for p in lines} == {(5, "url")}
    assert [p.done for p in lines] == sorted(p.done for p in lines)
