"""Nothing doubled: content-named parts, the dedupe pass, a write task killed mid-job, a second job refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipelines.data.dedupe import dedupe
from pipelines.data.latent_store import OUTPUT_SCHEMA, LatentWriter, reason_text
from pipelines.lease import Lease

from tests.pipelines.helpers import read_parts

FS = pafs.LocalFileSystem()


def _block(*specs) -> pa.Table:
    """OUTPUT_SCHEMA rows from (kind, key, res, sha256 or reason code)."""
    rows = []
    for kind, key, res, value in specs:
        latent = kind == "latent"
        rows.append({"kind": kind, "key": key, "res": res, "sha256": value if latent else None,
                     "reason_code": None if latent else value, "reason": None if latent else reason_text(value),
                     "stage": None if latent else "decode", "latent": value.encode() if latent else None,
                     "latent_shape": [1] if latent else None})
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


def _write(root: Path, block: pa.Table, mtime: float) -> None:
    """Write a block's parts, dated `mtime` (the order in which the job's tasks finished)."""
    before = set(root.rglob("*.parquet"))
    LatentWriter(FS, str(root)).write(block)
    for path in set(root.rglob("*.parquet")) - before:
        os.utime(path, (mtime, mtime))


def _rows(root: Path, folder: str) -> list[tuple]:
    return sorted((r["key"], r.get("sha256") or r.get("reason_code"), r.get("res"))
                  for r in read_parts(FS, str(root / folder)))


def test_a_retried_write_replaces_its_parts(tmp_path):
    block = _block(("latent", "a", 32, "s1"), ("latent", "b", 32, "s2"), ("latent", "a", 64, "s1"),
                   ("error", "c", None, "empty_file"))
    LatentWriter(FS, str(tmp_path)).write(block)
    LatentWriter(FS, str(tmp_path)).write(block.take([3, 2, 1, 0]))  # the same block again, rows in another order
    assert len(list(tmp_path.rglob("*.parquet"))) == 3  # res=32, res=64, errors: one part each
    assert _rows(tmp_path, "res=32") == [("a", "s1", None), ("b", "s2", None)]
    LatentWriter(FS, str(tmp_path)).write(_block(("latent", "b", 32, "s2")))  # another composition: another name
    assert len(list((tmp_path / "res=32").glob("*.parquet"))) == 2


def test_dedupe_keeps_the_newest_row_of_each_key(tmp_path):
    # a block re-executed in another composition after its worker died: b written twice
    _write(tmp_path, _block(("latent", "a", 32, "sa"), ("latent", "b", 32, "sb")), 1000)
    _write(tmp_path, _block(("latent", "b", 32, "sb"), ("latent", "c", 32, "sc")), 1001)
    # a stale row: d recomputed from new bytes in a later run (a block of the same composition would have
    # replaced the part: same name)
    _write(tmp_path, _block(("latent", "d", 32, "old"), ("latent", "h", 32, "sh"), ("latent", "d", 64, "old")), 900)
    _write(tmp_path, _block(("latent", "d", 32, "new"), ("latent", "d", 64, "new")), 2000)
    # e's source changed and now fails at 64: its old 64 latent goes, its 32 latent (newer than the error) stays
    _write(tmp_path, _block(("latent", "e", 64, "se")), 900)
    _write(tmp_path, _block(("error", "e", 64, "too_small")), 2000)
    _write(tmp_path, _block(("latent", "e", 32, "se2")), 2100)
    # the same error row twice (two compositions)
    _write(tmp_path, _block(("error", "f", None, "empty_file")), 1000)
    _write(tmp_path, _block(("error", "f", None, "empty_file"), ("error", "g", None, "not_an_image")), 1001)

    assert dedupe(FS, str(tmp_path), [32, 64]) == 5  # b, d@32, d@64, e@64, f
    assert _rows(tmp_path, "res=32") == [("a", "sa", None), ("b", "sb", None), ("c", "sc", None),
                                         ("d", "new", None), ("e", "se2", None), ("h", "sh", None)]
    assert _rows(tmp_path, "res=64") == [("d", "new", None)]
    assert _rows(tmp_path, "errors") == [("e", "too_small", 64), ("f", "empty_file", None),
                                         ("g", "not_an_image", None)]
    assert not list((tmp_path / "res=64").glob(".tmp*"))  # rewritten atomically; emptied parts deleted
    assert len(list((tmp_path / "res=64").glob("*.parquet"))) == 1
    assert dedupe(FS, str(tmp_path), [32, 64]) == 0  # a second pass finds nothing


def test_dedupe_tie_keeps_the_first_part_by_name(tmp_path):
    _write(tmp_path, _block(("latent", "a", 32, "s"), ("latent", "b", 32, "s")), 1000)
    _write(tmp_path, _block(("latent", "a", 32, "s")), 1000)  # as new as the other: the same rows
    first = sorted(p.name for p in (tmp_path / "res=32").glob("*.parquet"))[0]
    assert dedupe(FS, str(tmp_path), [32]) == 1
    holding_a = [p.name for p in (tmp_path / "res=32").glob("*.parquet")
                 if "a" in pq.read_table(p, columns=["key"])["key"].to_pylist()]
    assert holding_a == [first] and _rows(tmp_path, "res=32") == [("a", "s", None), ("b", "s", None)]


# --- integration: real jobs on the session's Ray cluster ---------------------------------------------------

def _job(ray_cluster, vae_dir: Path, images: Path, output: Path, env_vars: dict | None = None):
    from tests.image_cases import MAX_PIXELS
    from tests.pipelines.helpers import ray_job_submit

    return ray_job_submit(ray_cluster, ["jobs/precompute_latents.py", "--input", str(images), "--output",
                                        str(output), "--res", "32", "--vae", str(vae_dir), "--max-pixels",
                                        str(MAX_PIXELS), "--batch-size", "4", "--rows-per-file", "4"],
                          env_vars=env_vars)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    from tests.tiny_models import make_tiny_vae

    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "vae")


@pytest.mark.integration
@pytest.mark.chaos
def test_write_task_killed_after_its_part_every_key_once(ray_cluster, vae_dir, tmp_path):
    from tests.image_cases import cases, write_folder

    good = [c for c in cases() if c.expected[32] is None]
    write_folder(tmp_path / "images", good)
    victim = good[0].name
    faults = {"write.kill": {"keys": [victim], "times": 1, "state": str(tmp_path / "faults")}}
    result = _job(ray_cluster, vae_dir, tmp_path / "images", tmp_path / "latents", {"HDM_FAULTS": json.dumps(faults)})
    assert result.returncode == 0, result.output[-4000:]
    assert len(list((tmp_path / "faults").iterdir())) == 1  # the fault fired: a write task died after writing
    keys = [r["key"] for r in read_parts(FS, str(tmp_path / "latents" / "res=32"))]
    assert sorted(keys) == sorted(c.name for c in good)  # every key, exactly once
    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows"] == {"32": len(good)}
    assert not (tmp_path / "latents" / "_lease.json").exists()  # released at the end


@pytest.mark.integration
@pytest.mark.chaos
def test_second_job_on_a_leased_output_is_refused(ray_cluster, vae_dir, tmp_path):
    from tests.image_cases import cases, write_folder

    write_folder(tmp_path / "images", [c for c in cases() if c.name == "rgb.jpg"])
    with Lease.acquire(FS, str(tmp_path / "latents"), holder="ray job raysubmit_first (host pid 1)", ttl_s=60):
        result = subprocess.run([sys.executable, "jobs/precompute_latents.py", "--input", str(tmp_path / "images"),
                                 "--output", str(tmp_path / "latents"), "--res", "32", "--vae", str(vae_dir)],
                                capture_output=True, text=True, cwd=Path(__file__).resolve().parents[3],
                                timeout=300, env={**os.environ, "RAY_ADDRESS": ray_cluster["RAY_ADDRESS"]})
    assert result.returncode == 3, result.stderr[-3000:]
    assert "raysubmit_first" in result.stderr and "expires" in result.stderr
    assert sorted(p.name for p in (tmp_path / "latents").iterdir()) == []  # nothing written, not even a manifest
