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
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.faults import inject
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
        name = part_name(table)
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
        inject("write.kill", table["key"].to_pylist())  # a write task dying after its parts are written
        return stats

    def _write(self, path: str, table: pa.Table) -> None:
        """Atomically: a retried write of the same block replaces the part (same name, same rows)."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        write_bytes_atomic(self.fs, path, buf.getvalue())


def part_name(table: pa.Table) -> str:
    """The file name of a block's parts, after what it holds: the sorted (kind, key, res) of its rows. A write
    retried after its worker died rewrites the same names instead of adding a second copy."""
    rows = sorted(zip(table["kind"].to_pylist(), table["key"].to_pylist(), table["res"].to_pylist()),
                  key=lambda r: (r[0], r[1], -1 if r[2] is None else r[2]))
    digest = hashlib.sha256("\n".join(f"{k}\t{key}\t{res}" for k, key, res in rows).encode()).hexdigest()
    return f"part-{digest[:32]}.parquet"


# ---------------------------------------------------------------------------------------------------
# Reading back: keys already done (resume) and counts (manifest)

def done_keys(fs: pafs.FileSystem, root: str, resolutions: Iterable[int]) -> dict[int, dict[str, str | None]]:
    """Per resolution, key -> the sha256 of the source bytes its latent row was made from, or None for a key
    that ended in an error row (done, not retried) or whose row has no sha256 (nothing to compare)."""
    done: dict[int, dict[str, str | None]] = {}
    for res in resolutions:
        rows = _table(fs, res_dir(root, res), ["key", "sha256"])
        done[res] = {k: sha or None for k, sha in zip(rows["key"].to_pylist(), rows["sha256"].to_pylist())}
    errors = _table(fs, join(root, "errors"), ["key", "res"])
    for key, res in zip(errors["key"].to_pylist(), errors["res"].to_pylist()):
        for r in done if res is None else ([res] if res in done else []):
            done[r][key] = None
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
    return pa.concat_tables(read_columns(fs, f, columns) for f in files)


def read_columns(fs: pafs.FileSystem, path: str, columns: list[str]) -> pa.Table:
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
    """The output already holds latents made with another VAE (config or weights), transform, input or code."""


def build_manifest(*, vae: str, vae_config: dict, latent_mean: list[float], latent_std: list[float],
                   transform: dict, resolutions: list[int], store_std: bool, vae_weights_sha256: str | None = None,
                   input: str | None = None) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps(_plain(vae_config), sort_keys=True).encode()).hexdigest()
    return {"format": "hdm-latents/1", "vae": vae, "vae_config_sha256": digest,
            "vae_weights_sha256": vae_weights_sha256, "input": input,
            "latent_mean": latent_mean, "latent_std": latent_std, "latent_dtype": "float16",
            "store_std": store_std, "transform": transform, "resolutions": sorted(resolutions),
            "code_sha256": code_digest(), "code_version": code_version()}


def _plain(config: dict) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}  # drop diffusers' bookkeeping


# what decides a latent besides the VAE and the transform: mixing latents of two versions of these is refused
LATENT_CODE = ("pipelines/data/images.py", "pipelines/data/stages.py", "pipelines/data/encode.py",
               "pipelines/data/sources.py", "hdm_model/vae.py")
GUARDED = {"vae_weights_sha256": None, "input": "allow_input_change", "code_sha256": "allow_code_change"}


def check_manifest(existing: dict[str, Any], new: dict[str, Any], *, allow_code_change: bool = False,
                   allow_input_change: bool = False) -> list[str]:
    """Refuse to mix latents: the VAE (config and weights), its statistics, the transform, the input root and
    the code must match the stored manifest (input and code unless allowed). Returns notes to print: a guard
    the stored manifest predates (recorded now), one that cannot be checked (the stored value kept in `new`),
    or a change allowed."""
    fields = ("vae_config_sha256", "latent_mean", "latent_std", "transform", "store_std")
    diffs = [f"{f}: stored {existing.get(f)!r}, now {new.get(f)!r}" for f in fields if existing.get(f) != new.get(f)]
    allowed = {"allow_code_change": allow_code_change, "allow_input_change": allow_input_change}
    notes = []
    for f, flag in GUARDED.items():
        if new.get(f) is None:  # the hub VAE's weights are not on this machine: nothing to compare
            new[f] = existing.get(f)
            notes.append(f"{f} not checked: the weights of {new.get('vae')!r} are not on this machine")
        elif existing.get(f) is None:  # a manifest written before this guard: resumable, recorded now
            notes.append(f"the stored manifest has no {f}: recording {new[f]!r} now")
        elif existing[f] != new[f] and flag is not None and allowed[flag]:
            notes.append(f"{f} changed ({flag}): stored {existing[f]!r}, now {new[f]!r}")
        elif existing[f] != new[f]:
            hint = f" (or pass --{flag.replace('_', '-')})" if flag else ""
            diffs.append(f"{f}: stored {existing[f]!r}, now {new[f]!r}{hint}")
    if diffs:
        raise ManifestMismatch(
            "the output already holds latents made differently; use another output or the same settings:\n  "
            + "\n  ".join(diffs) + f"\n(stored VAE {existing.get('vae')!r}, now {new.get('vae')!r}; stored code "
            f"{existing.get('code_version')!r}, now {new.get('code_version')!r})")
    return notes


def code_digest() -> str:
    """sha256 of the package version and the source files that decide the latents (LATENT_CODE)."""
    repo = Path(__file__).resolve().parents[2]
    h = hashlib.sha256(_package_version().encode())
    for name in LATENT_CODE:
        h.update(f"\0{name}\0".encode() + (repo / name).read_bytes())
    return h.hexdigest()


def vae_weights_digest(vae: str) -> str | None:
    """sha256 over the VAE's weight files (*.safetensors, *.bin) of a local folder, or of the hub cache's
    snapshot of a hub id (resolved without downloading); None when the weights are not on this machine."""
    folder = Path(vae)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(vae, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the cache (the encoders download it): nothing to hash here
            return None
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin"))
    if not files:
        return None
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            h.update(f"\0{path.relative_to(folder).as_posix()}\0".encode() + hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def read_manifest(fs: pafs.FileSystem, root: str) -> dict[str, Any] | None:
    path = join(root, MANIFEST)
    return json.loads(read_bytes(fs, path)) if exists(fs, path) else None


def write_manifest(fs: pafs.FileSystem, root: str, manifest: dict[str, Any]) -> None:
    manifest = {**manifest, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_bytes_atomic(fs, join(root, MANIFEST), json.dumps(manifest, indent=2).encode())


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hdm-pipeline")
    except PackageNotFoundError:
        return "unknown"


def code_version() -> str:
    """The package version and git commit (information: the check is on code_digest)."""
    pkg = _package_version()
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{pkg}+{sha}" if sha else pkg
