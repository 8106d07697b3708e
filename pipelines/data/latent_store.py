"""The latent dataset on disk or S3 (design.md, Data contracts).

    OUTPUT/res=R/*.parquet   one row per image at resolution R (the whole resized latent)
    OUTPUT/errors/*.parquet  one row per rejected input (res null: every resolution) or input x resolution
    OUTPUT/manifest.json     VAE, latent statistics, transform spec, resolutions, counts, code version

`latent` holds fp16 C-order bytes of shape `latent_shape` = [C, h, w] (normalised: (x - mean) / std);
`latent_std` the posterior std in the same space, when stored. Readable by any Parquet reader.
An error row's `reason_code` is one of `ReasonCode` (or an img2dataset status); `reason` is the full text.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.storage import exists, join, list_files, read_bytes, write_bytes_atomic

LATENT_SCHEMA = pa.schema([
    ("key", pa.string()), ("sha256", pa.string()), ("source", pa.string()),
    ("caption", pa.string()), ("caption_source", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()),  # original image
    ("resized_width", pa.int32()), ("resized_height", pa.int32()),  # what the VAE encoded
    ("aspect", pa.float32()),  # resized width / height
    ("latent", pa.binary()), ("latent_shape", pa.list_(pa.int32())), ("latent_std", pa.binary()),
])
ERROR_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("stage", pa.string()),
    ("reason_code", pa.string()),  # what summaries and the manifest count (ReasonCode)
    ("reason", pa.string()),  # "code: detail", or the code alone (reason_text)
    ("res", pa.int32()),  # null: the input failed for every resolution
])
# What the encoder stage emits: both kinds of row in one table, told apart by `kind`.
OUTPUT_SCHEMA = pa.schema([("kind", pa.string()), ("res", pa.int32())]
                          + [f for f in LATENT_SCHEMA if f.name not in ("res",)]
                          + [f for f in ERROR_SCHEMA if f.name in ("stage", "reason_code", "reason")])


class ReasonCode:
    """The `reason_code` of an error row. img2dataset's own statuses (`failed_to_download`, ...) are codes
    too, passed through as the input gives them, so this is not a closed set."""

    EMPTY_FILE = "empty_file"
    NOT_AN_IMAGE = "not_an_image"
    CORRUPT_IMAGE = "corrupt_image"  # e.g. truncated
    DECOMPRESSION_BOMB = "decompression_bomb"  # over max_pixels
    TOO_SMALL = "too_small"  # short side below the resolution: that resolution only
    UNREADABLE_SHARD = "unreadable_shard"
    MISSING_IMAGE = "missing_image"  # an input row or sample without image bytes
    UNSUPPORTED_FORMAT = "unsupported_format"  # a file of a format not decoded here (.heic, .avif, .eps, ...)
    CORRUPT_RECORD = "corrupt_record"  # one record of a shard unreadable; the rest of the shard is read
    DECODE_MEMORY = "decode_memory"  # decoding would take more memory than the guard allows
    TRANSFORM_FAILED = "transform_failed"  # an error after decode (EXIF transpose, conversion, resize)
    CAPTION_FAILED = "caption_failed"  # the captioner raised for this image
    ENCODE_FAILED = "encode_failed"  # the VAE raised for this image alone (e.g. out of memory)
    WORKER_CRASHED = "worker_crashed"  # the input killed its worker process on every attempt


def reason_text(code: str, detail: str = "") -> str:
    """The `reason` of an error row: the code, then the detail when there is one."""
    return f"{code}: {detail}" if detail else code


def _legacy_code(reason: str) -> str:
    """The code of an error row written before `reason_code` existed: `reason` up to its first colon."""
    return reason.split(":", 1)[0]


MANIFEST = "manifest.json"


def res_dir(root: str, res: int) -> str:
    return join(root, f"res={res}")


def decode_latent(row: dict[str, Any], column: str = "latent") -> np.ndarray:
    """(C, h, w) float16 array of a stored row."""
    return np.frombuffer(row[column], dtype=np.float16).reshape(row["latent_shape"])


# ---------------------------------------------------------------------------------------------------
# Writing

class LatentWriter:
    """Splits output tables by kind and resolution and writes one Parquet file per part, atomically."""

    def __init__(self, fs: pafs.FileSystem, root: str):
        self.fs, self.root = fs, root

    def write(self, table: pa.Table) -> dict[str, Any]:
        stats: dict[str, Any] = {"rows": Counter(), "errors": Counter()}
        name = f"part-{uuid.uuid4().hex}.parquet"
        latents = table.filter(pc.equal(table["kind"], "latent"))
        for res in sorted(set(latents["res"].to_pylist())):
            part = latents.filter(pc.equal(latents["res"], res)).select(LATENT_SCHEMA.names).cast(LATENT_SCHEMA)
            self._write(join(res_dir(self.root, res), name), part)
            stats["rows"][res] += part.num_rows
        errors = table.filter(pc.equal(table["kind"], "error"))
        if errors.num_rows:
            part = errors.select(ERROR_SCHEMA.names).cast(ERROR_SCHEMA)
            self._write(join(self.root, "errors", name), part)
            stats["errors"].update(part["reason_code"].to_pylist())
        return stats

    def _write(self, path: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        write_bytes_atomic(self.fs, path, buf.getvalue())


# ---------------------------------------------------------------------------------------------------
# Reading back: keys already done (resume) and counts (manifest)

def done_keys(fs: pafs.FileSystem, root: str, resolutions: Iterable[int]) -> dict[int, set[str]]:
    """Per resolution, the keys that already have a latent row or an error row (either ends that key)."""
    done = {res: set(_column(fs, res_dir(root, res), "key")) for res in resolutions}
    errors = _table(fs, join(root, "errors"), ["key", "res"])
    for key, res in zip(errors["key"].to_pylist(), errors["res"].to_pylist()):
        for r in done if res is None else ([res] if res in done else []):
            done[r].add(key)
    return done


def count_rows(fs: pafs.FileSystem, root: str, resolutions: Iterable[int]) -> dict[str, Any]:
    errors = _table(fs, join(root, "errors"), ["reason_code", "res"])
    reasons = Counter(errors["reason_code"].to_pylist())
    return {"rows": {str(res): len(_column(fs, res_dir(root, res), "key")) for res in resolutions},
            "errors": errors.num_rows, "errors_by_reason": dict(sorted(reasons.items()))}


def _table(fs: pafs.FileSystem, path: str, columns: list[str]) -> pa.Table:
    files = [f for f in list_files(fs, path) if f.endswith(".parquet")]
    if not files:
        return pa.table({c: pa.array([], type=ERROR_SCHEMA.field(c).type if c in ERROR_SCHEMA.names else pa.string())
                         for c in columns})
    return pa.concat_tables(_read(fs, f, columns) for f in files)


def _read(fs: pafs.FileSystem, path: str, columns: list[str]) -> pa.Table:
    """`columns` of one Parquet file; an errors/ file written before `reason_code` existed (an output made by
    an older version, resumed) gets it derived from `reason`."""
    if "reason_code" in columns and "reason_code" not in pq.read_schema(path, filesystem=fs).names:
        wanted = [c for c in columns if c not in ("reason_code", "reason")] + ["reason"]
        table = pq.read_table(path, columns=wanted, filesystem=fs)
        codes = pa.array([_legacy_code(r) for r in table["reason"].to_pylist()], pa.string())
        return table.append_column("reason_code", codes).select(columns)
    return pq.read_table(path, columns=columns, filesystem=fs).select(columns)


def _column(fs: pafs.FileSystem, path: str, column: str) -> list:
    return _table(fs, path, [column])[column].to_pylist()


# ---------------------------------------------------------------------------------------------------
# Manifest

class ManifestMismatch(RuntimeError):
    """The output already holds latents made with another VAE or transform."""


def build_manifest(*, vae: str, vae_config: dict, latent_mean: list[float], latent_std: list[float],
                   transform: dict, resolutions: list[int], store_std: bool) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps(_plain(vae_config), sort_keys=True).encode()).hexdigest()
    return {"format": "hdm-latents/1", "vae": vae, "vae_config_sha256": digest,
            "latent_mean": latent_mean, "latent_std": latent_std, "latent_dtype": "float16",
            "store_std": store_std, "transform": transform, "resolutions": sorted(resolutions),
            "code_version": code_version()}


def _plain(config: dict) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}  # drop diffusers' bookkeeping


def check_manifest(existing: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse to mix latents: the VAE, its statistics and the transform must match the stored manifest."""
    fields = ("vae_config_sha256", "latent_mean", "latent_std", "transform", "store_std")
    diffs = [f"{f}: stored {existing.get(f)!r}, now {new.get(f)!r}" for f in fields if existing.get(f) != new.get(f)]
    if diffs:
        raise ManifestMismatch(
            "the output already holds latents made differently; use another output or the same settings:\n  "
            + "\n  ".join(diffs) + f"\n(stored VAE {existing.get('vae')!r}, now {new.get('vae')!r})")


def read_manifest(fs: pafs.FileSystem, root: str) -> dict[str, Any] | None:
    path = join(root, MANIFEST)
    return json.loads(read_bytes(fs, path)) if exists(fs, path) else None


def write_manifest(fs: pafs.FileSystem, root: str, manifest: dict[str, Any]) -> None:
    manifest = {**manifest, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_bytes_atomic(fs, join(root, MANIFEST), json.dumps(manifest, indent=2).encode())


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("hdm-pipeline")
    except PackageNotFoundError:
        pkg = "unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{pkg}+{sha}" if sha else pkg
