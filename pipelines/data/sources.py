"""Input discovery and reading: img2dataset parquet / webdataset shards and plain image folders.

The driver lists *units* (a shard, or one image file of a folder); Ray tasks read them with
`read_unit`, which yields one row per input image: either an item (the encoded bytes and a caption) or
an error (an img2dataset row that did not download, an unreadable shard). Nothing is dropped silently.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.data.images import IMAGE_EXTENSIONS
from pipelines.data.latent_store import ReasonCode, reason_text
from pipelines.storage import exists, list_files, read_bytes

IMAGE_COLUMNS = ("jpg", "png", "webp", "jpeg")


@dataclass(frozen=True)
class Unit:
    kind: str  # "file" (one image of a folder), "parquet" or "tar" (an img2dataset shard)
    path: str
    key: str = ""  # for files: the path relative to the input root (known before reading)
    sidecar: str = ""  # caption .txt of a file, or metadata .parquet of a tar


def detect_format(files: list[str]) -> str:
    if any(f.endswith(".tar") for f in files):
        return "webdataset"
    if any(f.endswith(".parquet") for f in files):
        return "parquet"
    return "folder"


def list_units(fs: pafs.FileSystem, root: str, input_format: str = "auto") -> tuple[str, list[Unit]]:
    """(format, units) for everything under `root`."""
    if not exists(fs, root):
        raise FileNotFoundError(f"input {root!r} does not exist")
    files = list_files(fs, root)
    fmt = detect_format(files) if input_format == "auto" else input_format
    if fmt == "parquet":
        return fmt, [Unit("parquet", f) for f in files if f.endswith(".parquet")]
    if fmt == "webdataset":
        present = set(files)
        return fmt, [Unit("tar", f, sidecar=_with_suffix(f, ".parquet") if _with_suffix(f, ".parquet") in present else "")
                     for f in files if f.endswith(".tar")]
    present = set(files)
    units = []
    for f in files:
        if f.lower().endswith(IMAGE_EXTENSIONS):
            txt = _with_suffix(f, ".txt")
            units.append(Unit("file", f, key=str(PurePosixPath(f).relative_to(root)),
                              sidecar=txt if txt in present else ""))
    return fmt, units


def _with_suffix(path: str, suffix: str) -> str:
    return str(PurePosixPath(path).with_suffix(suffix))


def item(key: str, source: str, data: bytes, caption: str | None, caption_source: str) -> dict:
    return {"kind": "item", "key": key, "source": source, "data": data, "caption": caption or "",
            "caption_source": caption_source if caption else "none"}


def error(key: str, source: str, *, stage: str, code: str, detail: str = "", res: int | None = None) -> dict:
    """An error row: `code` (a ReasonCode or an img2dataset status) is what gets counted; `res` None: every
    resolution."""
    return {"kind": "error", "key": key, "source": source, "stage": stage, "reason_code": code,
            "reason": reason_text(code, detail)[:500], "err_res": res}


def read_unit(fs: pafs.FileSystem, unit: Unit) -> Iterator[dict]:
    """Rows of one unit; an unreadable shard becomes one error row keyed by its path."""
    try:
        if unit.kind == "file":
            caption = read_bytes(fs, unit.sidecar).decode("utf-8", "replace").strip() if unit.sidecar else None
            yield item(unit.key, unit.path, read_bytes(fs, unit.path), caption, "sidecar")
        elif unit.kind == "parquet":
            yield from _read_img2dataset_parquet(fs, unit.path)
        elif unit.kind == "tar":
            yield from _read_webdataset_tar(fs, unit)
        else:
            raise ValueError(f"unknown unit kind {unit.kind!r}")
    except Exception as e:  # noqa: BLE001 - a broken shard must not stop the job
        yield error(unit.key or unit.path, unit.path, stage="read", code=ReasonCode.UNREADABLE_SHARD,
                    detail=f"{type(e).__name__}: {e}")


def _status_error(row: dict, source: str) -> dict | None:
    status = row.get("status")
    if status in (None, "success"):
        return None
    detail = row.get("error_message") or ""
    return error(str(row["key"]), row.get("url") or source, stage="input", code=str(status), detail=detail)


def _caption_of(row: dict) -> str | None:
    for column in ("txt", "caption"):
        if row.get(column):
            return str(row[column])
    return None


def _read_img2dataset_parquet(fs: pafs.FileSystem, path: str) -> Iterator[dict]:
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        image_col = next((c for c in IMAGE_COLUMNS if c in names), None)
        if image_col is None or "key" not in names:
            raise ValueError(f"not an img2dataset parquet shard (columns {names})")
        columns = [c for c in ("key", image_col, "txt", "caption", "status", "error_message", "url") if c in names]
        for batch in parquet.iter_batches(batch_size=64, columns=columns):
            for row in batch.to_pylist():
                failed = _status_error(row, path)
                if failed is not None:
                    yield failed
                elif row.get(image_col) is None:
                    yield error(str(row["key"]), row.get("url") or path, stage="input", code=ReasonCode.MISSING_IMAGE)
                else:
                    yield item(str(row["key"]), row.get("url") or path, row[image_col], _caption_of(row), "input")


def _read_webdataset_tar(fs: pafs.FileSystem, unit: Unit) -> Iterator[dict]:
    if unit.sidecar:  # img2dataset lists every row, failed downloads included, in the shard's parquet
        for row in pq.read_table(unit.sidecar, filesystem=fs).to_pylist():
            failed = _status_error(row, unit.path)
            if failed is not None:
                yield failed
    with fs.open_input_stream(unit.path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        sample_key, files = None, {}
        for member in tar:
            if not member.isfile():
                continue
            name = PurePosixPath(member.name)
            key, ext = name.name.split(".", 1)[0], name.name.split(".", 1)[-1].lower()
            key = str(name.parent / key) if str(name.parent) != "." else key
            if sample_key is not None and key != sample_key:
                yield from _webdataset_sample(sample_key, files, unit.path)
                files = {}
            sample_key = key
            files[ext] = tar.extractfile(member).read()
        if sample_key is not None:
            yield from _webdataset_sample(sample_key, files, unit.path)


def _webdataset_sample(key: str, files: dict[str, bytes], source: str) -> Iterator[dict]:
    image_ext = next((e for e in IMAGE_COLUMNS if e in files), None)
    meta = json.loads(files["json"]) if "json" in files else {}
    source = meta.get("url") or f"{source}#{key}"
    if image_ext is None:
        yield error(key, source, stage="read", code=ReasonCode.MISSING_IMAGE)
        return
    caption = files["txt"].decode("utf-8", "replace") if "txt" in files else meta.get("caption")
    yield item(key, source, files[image_ext], caption, "input")
