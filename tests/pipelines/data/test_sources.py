"""pipelines.data.sources: every input accounted for. img2dataset shards built as img2dataset writes them
(parquet: one row group per 100 rows; webdataset: a tar of KEY.jpg/.txt/.json members beside a metadata
parquet), then damaged in the middle; folders with `_` names, hidden files and formats not decoded here."""

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.data.latent_store import ReasonCode
from pipelines.data.sources import list_units, read_unit

FS = pafs.LocalFileSystem()
PARQUET_SCHEMA = pa.schema([("key", pa.string()), ("jpg", pa.binary()), ("txt", pa.string()), ("url", pa.string()),
                            ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int32())])


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


def _samples(n: int) -> list[dict]:
    return [{"key": f"{i:09d}", "jpg": _jpeg(i), "txt": f"caption {i}", "url": f"http://example.com/{i}.jpg",
             "status": "success", "error_message": None, "width": 16} for i in range(n)]


def _img2dataset_parquet(path, rows: list[dict]) -> None:
    """As img2dataset's parquet output: a ParquetWriter fed 100 buffered rows at a time (a row group each)."""
    with pq.ParquetWriter(path, PARQUET_SCHEMA) as writer:
        for start in range(0, len(rows), 100):
            writer.write_table(pa.Table.from_pylist(rows[start:start + 100], schema=PARQUET_SCHEMA))


def _damage(path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _page_of(path, group: int, column: str) -> int:
    """Offset of the first data page header of a column chunk (damage there cannot pass unnoticed, as
    damage inside compressed image bytes can: decoding finds that one)."""
    meta = pq.ParquetFile(path).metadata.row_group(group)
    chunk = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == column)
    return chunk.data_page_offset


def _rows(path) -> list[dict]:
    (unit,) = list_units(FS, str(path)).units
    return list(read_unit(FS, unit))


def test_parquet_corrupt_page_costs_its_row_group_only(tmp_path):
    shard = tmp_path / "00000.parquet"
    _img2dataset_parquet(shard, _samples(250))
    _damage(shard, _page_of(shard, 1, "jpg"), b"\xff" * 64)  # rows 100-199: image page unreadable
    rows = _rows(tmp_path)
    assert len(rows) == 250 and len({r["key"] for r in rows}) == 250  # every key once
    kinds = Counter((r["kind"], r.get("reason_code")) for r in rows)
    assert kinds == {("item", None): 150, ("error", ReasonCode.CORRUPT_RECORD): 100}
    errors = {r["key"] for r in rows if r["kind"] == "error"}
    assert errors == {f"{i:09d}" for i in range(100, 200)}
    assert "row group 1 of 00000.parquet" in next(r for r in rows if r["kind"] == "error")["reason"]
    last = next(r for r in rows if r["key"] == f"{249:09d}")
    assert last["data"] == _jpeg(249) and last["caption"] == "caption 249"  # read after the damage, intact


def test_parquet_unreadable_keys_give_one_row_naming_the_range(tmp_path):
    shard = tmp_path / "00000.parquet"
    _img2dataset_parquet(shard, _samples(250))
    for column in ("key", "jpg"):
        _damage(shard, _page_of(shard, 2, column), b"\xff" * 64)
    rows = _rows(tmp_path)
    assert [r["kind"] for r in rows] == ["item"] * 200 + ["error"]
    assert rows[-1]["key"] == f"{shard}#rows=200-249" and rows[-1]["reason_code"] == ReasonCode.CORRUPT_RECORD


def test_parquet_without_footer_is_one_unreadable_shard(tmp_path):
    shard = tmp_path / "00000.parquet"
    _img2dataset_parquet(shard, _samples(10))
    shard.write_bytes(shard.read_bytes()[:-100])
    (row,) = _rows(tmp_path)
    assert row["key"] == str(shard) and row["reason_code"] == ReasonCode.UNREADABLE_SHARD


def _img2dataset_tar(folder, samples: list[dict], failed: int = 0) -> tuple:
    """As img2dataset's webdataset output: KEY.jpg/.json/.txt members (webdataset's TarWriter: mode 0444,
    user bigdata) and a metadata parquet listing every row, `failed` failed downloads included."""
    tar_path = folder / "00000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for s in samples:
            meta = {"url": s["url"], "key": s["key"], "status": "success", "caption": s["txt"]}
            for ext, data in (("jpg", s["jpg"]), ("json", json.dumps(meta).encode()), ("txt", s["txt"].encode())):
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size, info.mode, info.uname, info.gname = len(data), 0o444, "bigdata", "bigdata"
                tar.addfile(info, io.BytesIO(data))
    meta_rows = [{**s, "jpg": None} for s in samples] + [
        {"key": f"f{i:08d}", "jpg": None, "txt": None, "url": f"http://gone/{i}", "status": "failed_to_download",
         "error_message": "404", "width": None} for i in range(failed)]
    pq.write_table(pa.Table.from_pylist(meta_rows, schema=PARQUET_SCHEMA).drop_columns(["jpg"]),
                   folder / "00000.parquet")
    return tar_path


def _member_offset(tar_path, name: str) -> int:
    with tarfile.open(tar_path) as tar:
        return tar.getmember(name).offset


def _outcome(rows: list[dict]) -> dict[str, str]:
    return {r["key"]: r.get("reason_code") or "item" for r in rows}


def test_tar_bad_header_checksum_costs_its_sample_only(tmp_path):
    samples = _samples(20)
    tar_path = _img2dataset_tar(tmp_path, samples, failed=2)
    _damage(tar_path, _member_offset(tar_path, "000000007.jpg") + 148, b"99999\0")  # checksum field
    rows = _rows(tmp_path)
    outcome = _outcome(rows)
    assert len(rows) == len(outcome) == 22  # 20 samples + 2 failed downloads, each once
    assert outcome.pop("000000007") == ReasonCode.CORRUPT_RECORD
    assert outcome.pop("f00000000") == outcome.pop("f00000001") == "failed_to_download"
    assert set(outcome.values()) == {"item"}
    row8 = next(r for r in rows if r["key"] == "000000008")
    assert row8["data"] == samples[8]["jpg"] and row8["caption"] == "caption 8" and row8["source"].endswith("8.jpg")


def test_tar_data_cut_short_resynchronises_on_the_next_header(tmp_path):
    samples = _samples(20)
    tar_path = _img2dataset_tar(tmp_path, samples)
    raw = tar_path.read_bytes()
    start = _member_offset(tar_path, "000000005.jpg") + 512 + 100
    tar_path.write_bytes(raw[:start] + raw[start + 333:])  # 333 bytes of one image gone: all after shifts
    outcome = _outcome(_rows(tmp_path))
    assert len(outcome) == 20
    assert outcome.pop("000000005") == ReasonCode.CORRUPT_RECORD
    assert set(outcome.values()) == {"item"}


def test_tar_header_without_a_name_and_a_lost_member_are_accounted(tmp_path):
    samples = _samples(10)
    tar_path = _img2dataset_tar(tmp_path, samples)
    offsets = [_member_offset(tar_path, f"000000003.{ext}") for ext in ("jpg", "json", "txt")]
    for offset in offsets:  # sample 3's headers wiped, names included: only the metadata parquet knows it
        _damage(tar_path, offset, b"\xee" * 512)
    rows = _rows(tmp_path)
    outcome = _outcome(rows)
    assert outcome.pop("000000003") == ReasonCode.CORRUPT_RECORD  # listed as downloaded, not in the tar
    damaged = {k: v for k, v in outcome.items() if "#byte=" in k}
    # one damaged stretch (three headers in a row), skipped at once
    assert len(damaged) == 1 and set(damaged.values()) == {ReasonCode.CORRUPT_RECORD}
    assert sorted(k for k in outcome if k not in damaged) == [f"{i:09d}" for i in range(10) if i != 3]


def test_tar_malformed_json_is_its_sample_error(tmp_path):
    samples = _samples(5)
    tar_path = _img2dataset_tar(tmp_path, samples)
    offset = _member_offset(tar_path, "000000002.json") + 512
    _damage(tar_path, offset, b"{not json")
    outcome = _outcome(_rows(tmp_path))
    assert outcome == {**{f"{i:09d}": "item" for i in range(5)}, "000000002": ReasonCode.CORRUPT_RECORD}


def test_tar_truncated_at_the_end_and_long_names(tmp_path):
    with tarfile.open(tmp_path / "00000.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [(f"{'d' * 120}/é.jpg", b"img0"), ("short.jpg", _jpeg(1))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(raw[:raw.index(_jpeg(1)) + 50])
    rows = _rows(tmp_path)
    assert [(r["key"], r["kind"]) for r in rows] == [(f"{'d' * 120}/é", "item"), ("short", "error")]
    assert "cut short" in rows[1]["reason"]


def test_folder_every_file_is_an_item_an_error_or_a_caption(tmp_path):
    files = {"_DSC1234.JPG": _jpeg(0), "_raw/a.png": _jpeg(1), "_raw/a.txt": b"raw caption", "b.heic": b"x",
             "c.avif": b"x", "d.eps": b"%!PS", "e.pdf": b"%PDF", "f.svg": b"<svg/>", "README.txt": b"hello",
             "notes": b"x", ".DS_Store": b"x", ".git/config": b"x", ".git/HEAD": b"x", "sub/.hidden.jpg": b"x"}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    listing = list_units(FS, str(tmp_path))
    fmt, units = listing
    assert fmt == "folder" and listing.hidden == 4
    rows = [row for unit in units for row in read_unit(FS, unit)]
    outcome = _outcome(rows)
    assert outcome == {"_DSC1234.JPG": "item", "_raw/a.png": "item", **{
        k: ReasonCode.UNSUPPORTED_FORMAT for k in ("b.heic", "c.avif", "d.eps", "e.pdf", "f.svg", "README.txt",
                                                   "notes")}}
    assert next(r for r in rows if r["key"] == "_raw/a.png")["caption"] == "raw caption"
    assert ".heic is not an image format read here" in next(r for r in rows if r["key"] == "b.heic")["reason"]
    assert "without an image" in next(r for r in rows if r["key"] == "README.txt")["reason"]


@pytest.mark.parametrize("kind", ["parquet", "webdataset"])
def test_shard_formats_ignore_img2dataset_stats_files(tmp_path, kind):
    if kind == "parquet":
        _img2dataset_parquet(tmp_path / "00000.parquet", _samples(3))
    else:
        _img2dataset_tar(tmp_path, _samples(3))
    (tmp_path / "00000_stats.json").write_text("{}")
    fmt, units = list_units(FS, str(tmp_path))
    assert fmt == kind and len(units) == 1
