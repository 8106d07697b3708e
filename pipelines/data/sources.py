"""Input discovery and reading: img2dataset parquet / webdataset shards and plain image folders.

The driver lists *units* (a shard, or one file of a folder); Ray tasks read them with `read_unit`, which
yields one row per input: either an item (the encoded bytes and a caption) or an error (an img2dataset row
that did not download, a damaged record, a file of a format not decoded here, an unreadable shard). Nothing
is dropped silently: under a folder input every file is an item, an error or the caption of an image; only
hidden names (".": .DS_Store, .git/) are skipped, and counted (`Listing.hidden`).

A damaged record costs that record only: a parquet row group that cannot be read gives an error row per key
of its unread rows (the rest of the shard is read), a tar member with a bad header or truncated data gives
an error row for its sample and reading goes on at the next valid header.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import NamedTuple

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.data.images import IMAGE_EXTENSIONS
from pipelines.data.latent_store import ReasonCode, reason_text
from pipelines.storage import exists, list_files, read_bytes

IMAGE_COLUMNS = ("jpg", "png", "webp", "jpeg")
CAPTION_SUFFIX = ".txt"  # the caption of NAME.jpg in a folder is NAME.txt


@dataclass(frozen=True)
class Unit:
    kind: str  # "file" (one image of a folder), "unsupported" (another file of a folder), "parquet" or "tar"
    path: str
    key: str = ""  # for files: the path relative to the input root (known before reading)
    sidecar: str = ""  # caption .txt of a file, or metadata .parquet of a tar


@dataclass(frozen=True)
class Listing:
    """What `list_units` found under an input root; unpacks as `fmt, units = list_units(...)`."""

    format: str
    units: list[Unit]
    hidden: int = 0  # files skipped because their name, or a folder's on the way, starts with "."

    def __iter__(self):
        return iter((self.format, self.units))


def detect_format(files: list[str]) -> str:
    if any(f.endswith(".tar") for f in files):
        return "webdataset"
    if any(f.endswith(".parquet") for f in files):
        return "parquet"
    return "folder"


def list_units(fs: pafs.FileSystem, root: str, input_format: str = "auto") -> Listing:
    """The units of everything under `root`: its shards, or every file of a folder (names starting with "_"
    included: `_DSC1234.JPG` is a photo)."""
    if not exists(fs, root):
        raise FileNotFoundError(f"input {root!r} does not exist")
    every = list_files(fs, root, skip=())
    files = [f for f in every if not any(part.startswith(".") for part in _relative(f, root).parts)]
    fmt = detect_format(files) if input_format == "auto" else input_format
    if fmt == "parquet":
        units = [Unit("parquet", f) for f in files if f.endswith(".parquet")]
    elif fmt == "webdataset":
        present = set(files)
        units = [Unit("tar", f, sidecar=_with_suffix(f, ".parquet") if _with_suffix(f, ".parquet") in present else "")
                 for f in files if f.endswith(".tar")]
    else:
        units = _folder_units(files, root)
    return Listing(fmt, units, hidden=len(every) - len(files))


def _folder_units(files: list[str], root: str) -> list[Unit]:
    """An image unit per image (with its caption sidecar), an "unsupported" unit per other file that is not
    the caption of an image."""
    present = set(files)
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    captions = {_with_suffix(f, CAPTION_SUFFIX) for f in images} & present
    units = []
    for f in files:
        key = str(_relative(f, root))
        if f.lower().endswith(IMAGE_EXTENSIONS):
            txt = _with_suffix(f, CAPTION_SUFFIX)
            units.append(Unit("file", f, key=key, sidecar=txt if txt in captions else ""))
        elif f not in captions:
            units.append(Unit("unsupported", f, key=key))
    return units


def _relative(path: str, root: str) -> PurePosixPath:
    return PurePosixPath(path).relative_to(root)


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
    """Rows of one unit; a shard that cannot be read at all (no footer, not a tar) becomes one error row
    keyed by its path."""
    try:
        if unit.kind == "file":
            caption = read_bytes(fs, unit.sidecar).decode("utf-8", "replace").strip() if unit.sidecar else None
            yield item(unit.key, unit.path, read_bytes(fs, unit.path), caption, "sidecar")
        elif unit.kind == "unsupported":
            yield error(unit.key, unit.path, stage="read", code=ReasonCode.UNSUPPORTED_FORMAT,
                        detail=_unsupported(unit.path))
        elif unit.kind == "parquet":
            yield from _read_img2dataset_parquet(fs, unit.path)
        elif unit.kind == "tar":
            yield from _read_webdataset_tar(fs, unit)
        else:
            raise ValueError(f"unknown unit kind {unit.kind!r}")
    except Exception as e:  # noqa: BLE001 - a broken shard must not stop the job
        yield error(unit.key or unit.path, unit.path, stage="read", code=ReasonCode.UNREADABLE_SHARD,
                    detail=f"{type(e).__name__}: {e}")


def _unsupported(path: str) -> str:
    suffix = PurePosixPath(path).suffix.lower()
    if suffix == CAPTION_SUFFIX:
        return f"a {CAPTION_SUFFIX} file without an image of the same name beside it"
    return f"{suffix or 'a file without extension'} is not an image format read here ({' '.join(IMAGE_EXTENSIONS)})"


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


# --- img2dataset parquet: one row group at a time --------------------------------------------------------

def _read_img2dataset_parquet(fs: pafs.FileSystem, path: str) -> Iterator[dict]:
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        image_col = next((c for c in IMAGE_COLUMNS if c in names), None)
        if image_col is None or "key" not in names:
            raise ValueError(f"not an img2dataset parquet shard (columns {names})")
        columns = [c for c in ("key", image_col, "txt", "caption", "status", "error_message", "url") if c in names]
        first = 0
        for group in range(parquet.num_row_groups):
            yield from _read_row_group(parquet, group, first, columns, image_col, path)
            first += parquet.metadata.row_group(group).num_rows


def _read_row_group(parquet: pq.ParquetFile, group: int, first: int, columns: list[str], image_col: str,
                    path: str) -> Iterator[dict]:
    """Rows of one row group (img2dataset writes one per 100 rows); from the first batch that cannot be read
    (a corrupt page), an error row per key of the rows left, or one for the whole range when even the keys
    cannot be read."""
    read = 0
    try:
        for batch in parquet.iter_batches(batch_size=64, row_groups=[group], columns=columns):
            for row in batch.to_pylist():
                yield _parquet_row(row, image_col, path)
                read += 1
    except Exception as e:  # noqa: BLE001 - a damaged row group costs its own rows only
        detail = f"row group {group} of {PurePosixPath(path).name}: {type(e).__name__}: {e}"
        try:
            keys = parquet.read_row_group(group, columns=["key"]).column("key").to_pylist()[read:]
        except Exception:  # noqa: BLE001 - the key column is damaged too: name the rows instead
            last = first + parquet.metadata.row_group(group).num_rows - 1
            yield error(f"{path}#rows={first + read}-{last}", path, stage="read", code=ReasonCode.CORRUPT_RECORD,
                        detail=detail)
            return
        for key in keys:
            yield error(str(key), path, stage="read", code=ReasonCode.CORRUPT_RECORD, detail=detail)


def _parquet_row(row: dict, image_col: str, path: str) -> dict:
    failed = _status_error(row, path)
    if failed is not None:
        return failed
    if row.get(image_col) is None:
        return error(str(row["key"]), row.get("url") or path, stage="input", code=ReasonCode.MISSING_IMAGE)
    return item(str(row["key"]), row.get("url") or path, row[image_col], _caption_of(row), "input")


# --- webdataset tar: members found by their headers, damage skipped -----------------------------------------

def _read_webdataset_tar(fs: pafs.FileSystem, unit: Unit) -> Iterator[dict]:
    """Samples of a tar (its members grouped by key, in order), after the failed rows of its img2dataset
    metadata .parquet; a key that parquet lists as downloaded but the tar has not is an error row too."""
    downloaded = set()
    if unit.sidecar:  # img2dataset lists every row, failed downloads included, in the shard's parquet
        for row in pq.read_table(unit.sidecar, filesystem=fs).to_pylist():
            failed = _status_error(row, unit.path)
            if failed is not None:
                yield failed
            elif row.get("status") == "success":
                downloaded.add(str(row["key"]))
    # a shard is read whole anyway (ReadStage makes one block of it): holding its bytes lets a damaged header
    # be skipped by searching forward for the next one
    seen, key, files, problems = set(), None, {}, []
    for member in _tar_members(read_bytes(fs, unit.path)):
        if not member.name:  # a header too damaged to name its file
            yield error(f"{unit.path}#byte={member.offset}", unit.path, stage="read",
                        code=ReasonCode.CORRUPT_RECORD, detail=member.problem)
            continue
        name = PurePosixPath(member.name)
        stem, _, ext = name.name.partition(".")
        member_key = str(name.parent / stem) if str(name.parent) != "." else stem
        if key is not None and member_key != key:
            yield _webdataset_sample(key, files, problems, unit.path)
            files, problems = {}, []
        key = member_key
        seen.add(key)
        if member.problem:
            problems.append(f".{ext}: {member.problem}")
        else:
            files[ext.lower()] = member.data
    if key is not None:
        yield _webdataset_sample(key, files, problems, unit.path)
    for lost in sorted(downloaded - seen):
        yield error(lost, f"{unit.path}#{lost}", stage="read", code=ReasonCode.CORRUPT_RECORD,
                    detail=f"listed as downloaded in {PurePosixPath(unit.sidecar).name} but not in the tar")


def _webdataset_sample(key: str, files: dict[str, bytes], problems: list[str], source: str) -> dict:
    where = f"{source}#{key}"
    if problems:
        return error(key, where, stage="read", code=ReasonCode.CORRUPT_RECORD, detail="; ".join(problems))
    try:
        meta = json.loads(files["json"]) if "json" in files else {}
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError included
        return error(key, where, stage="read", code=ReasonCode.CORRUPT_RECORD, detail=f"malformed .json: {e}")
    source = meta.get("url") or where
    image_ext = next((e for e in IMAGE_COLUMNS if e in files), None)
    if image_ext is None:
        return error(key, source, stage="read", code=ReasonCode.MISSING_IMAGE)
    caption = files["txt"].decode("utf-8", "replace") if "txt" in files else meta.get("caption")
    return item(key, source, files[image_ext], caption, "input")


BLOCK = 512  # tar headers and data start on 512-byte boundaries


class Member(NamedTuple):
    name: str  # "" when the header is unreadable
    data: bytes | None  # None for a damaged member
    offset: int  # of its header
    problem: str = ""


def _tar_members(buf: bytes) -> Iterator[Member]:
    """Every regular file of a tar held in `buf`, and a damaged Member for a header that fails its checksum
    or data cut short; after damage, reading goes on at the next valid header (found by its "ustar" magic,
    at any byte offset, since a cut shifts everything after it)."""
    if _header(buf, 0) is None and _next_header(buf, 0) == len(buf):
        raise ValueError("not a tar file: no valid header")
    pos, long_name = 0, None
    while pos + BLOCK <= len(buf):
        info = _header(buf, pos)
        if info is None:
            if not any(buf[pos:pos + BLOCK]):  # end-of-archive zeros
                pos += BLOCK
                continue
            yield Member(_name_in(buf, pos), None, pos, f"tar header at byte {pos} fails its checksum")
            pos = _next_header(buf, pos + 1)
            continue
        start, end = pos + BLOCK, pos + BLOCK + info.size
        following = start + -(-info.size // BLOCK) * BLOCK
        name, long_name = long_name or info.name, None
        inner = None if _boundary(buf, following) else _next_header(buf, start)
        if end > len(buf) or (inner is not None and inner < end):  # the next member starts inside this one
            yield Member(name, None, pos, f"data cut short ({info.size} bytes in its header)")
            pos = inner if inner is not None else len(buf)
            continue
        data = buf[start:end]
        if info.type == tarfile.XHDTYPE:  # the next member's long or non-ASCII name
            long_name = _pax_path(data)
        elif info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif info.isreg():
            yield Member(name, data, pos)
        pos = following
    if any(buf[pos:]):
        yield Member(_name_in(buf, pos), None, pos, f"file ends inside the tar header at byte {pos}")


def _header(buf: bytes, pos: int) -> tarfile.TarInfo | None:
    try:
        return tarfile.TarInfo.frombuf(buf[pos:pos + BLOCK], "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return None


def _boundary(buf: bytes, pos: int) -> bool:
    """Whether a member may end where the next starts at `pos`: the end of the buffer, zeros or a header."""
    return pos >= len(buf) or not any(buf[pos:pos + BLOCK]) or _header(buf, pos) is not None


def _next_header(buf: bytes, start: int) -> int:
    """Offset of the first valid header at or after `start` (len(buf) if none)."""
    at = start + 257  # where "ustar" sits in a header
    while (at := buf.find(b"ustar", at)) != -1:
        if _header(buf, at - 257) is not None:
            return at - 257
        at += 1
    return len(buf)


def _name_in(buf: bytes, pos: int) -> str:
    """The file name of a damaged header when it still reads as one (a bad checksum often leaves it intact)."""
    raw = buf[pos:pos + 100].split(b"\0", 1)[0]
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        return ""
    return name if name.isprintable() and "." in name else ""


def _pax_path(data: bytes) -> str | None:
    for record in data.split(b"\n"):  # "LEN path=VALUE" records
        field, _, value = record.partition(b" ")[2].partition(b"=")
        if field == b"path":
            return value.decode("utf-8", "surrogateescape")
    return None
