import io
import json
import tarfile

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipelines.data.latent_store import (OUTPUT_SCHEMA, LatentWriter, ManifestMismatch, ReasonCode, check_manifest,
                                         code_digest, count_rows, done_keys, reason_text, vae_weights_digest)
from pipelines.data.sources import Unit, list_units, read_unit

FS = pafs.LocalFileSystem()


def _rows(*specs):
    """OUTPUT_SCHEMA rows from (kind, key, res, reason code or None[, detail])."""
    rows = []
    for kind, key, res, code, *detail in specs:
        rows.append({"kind": kind, "key": key, "res": res, "reason_code": code,
                     "reason": reason_text(code, *detail) if code else None, "stage": "decode" if code else None,
                     "latent": b"\x00\x00" * 4 if kind == "latent" else None,
                     "latent_shape": [1, 2, 2] if kind == "latent" else None})
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


def test_writer_splits_by_resolution_and_done_keys_include_errors(tmp_path):
    root = str(tmp_path)
    stats = LatentWriter(FS, root).write(_rows(("latent", "a", 256, None), ("latent", "a", 512, None),
                                               ("latent", "b", 256, None), ("error", "c", None, "not_an_image"),
                                               ("error", "b", 512, "too_small", "short side")))
    assert stats["rows"] == {256: 2, 512: 1}
    assert stats["errors"] == {"not_an_image": 1, "too_small": 1}  # by reason_code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["errors", "res=256", "res=512"]
    done = done_keys(FS, root, [256, 512, 768])
    assert done == {256: {"a": None, "b": None, "c": None}, 512: {"a": None, "b": None, "c": None}, 768: {"c": None}}
    assert count_rows(FS, root, [256, 512]) == {"rows": {"256": 2, "512": 1}, "errors": 2,
                                               "errors_by_reason": {"not_an_image": 1, "too_small": 1}}
    assert not any(p.name.startswith(".tmp") for p in tmp_path.rglob("*"))  # atomic writes leave nothing


def test_errors_written_before_reason_code_are_read_by_their_reason(tmp_path):
    """An output made before error rows had `reason_code`, resumed: its old errors/ files still end their keys
    and count under the code their `reason` starts with, beside new files."""
    old_schema = pa.schema([("key", pa.string()), ("source", pa.string()), ("stage", pa.string()),
                            ("reason", pa.string()), ("res", pa.int32())])
    (tmp_path / "errors").mkdir()
    pq.write_table(pa.Table.from_pylist([
        {"key": "a", "source": "s", "stage": "decode", "reason": "corrupt_image: broken data stream", "res": None},
        {"key": "b", "source": "s", "stage": "resize", "reason": "too_small: short side 20 px < 64", "res": 64},
        {"key": "c", "source": "u", "stage": "input", "reason": "failed_to_download: 404", "res": None},
    ], schema=old_schema), tmp_path / "errors" / "part-old.parquet")
    LatentWriter(FS, str(tmp_path)).write(_rows(("latent", "d", 32, None), ("error", "e", None, "not_an_image"),
                                                ("error", "f", 64, "too_small", "short side 40 px < 64")))
    done = done_keys(FS, str(tmp_path), [32, 64])
    assert {r: set(keys) for r, keys in done.items()} == {32: {"a", "c", "d", "e"}, 64: {"a", "b", "c", "e", "f"}}
    assert count_rows(FS, str(tmp_path), [32, 64]) == {
        "rows": {"32": 1, "64": 0}, "errors": 5,
        "errors_by_reason": {ReasonCode.CORRUPT_IMAGE: 1, "failed_to_download": 1, ReasonCode.NOT_AN_IMAGE: 1,
                             ReasonCode.TOO_SMALL: 2}}


def test_manifest_mismatch_lists_every_difference():
    stored = {"vae": "a", "vae_config_sha256": "1", "latent_mean": [0], "latent_std": [1], "transform": {"x": 1},
              "store_std": True}
    check_manifest(stored, dict(stored))
    with pytest.raises(ManifestMismatch) as info:
        check_manifest(stored, {**stored, "vae_config_sha256": "2", "transform": {"x": 2}})
    assert "vae_config_sha256" in str(info.value) and "transform" in str(info.value)


GUARDS = {"vae_weights_sha256": "w1", "input": "/data/a", "code_sha256": "c1"}


def test_manifest_guards_weights_input_and_code():
    stored = {"vae": "a", "vae_config_sha256": "1", "latent_mean": [0], "latent_std": [1], "transform": {},
              "store_std": True, **GUARDS}
    assert check_manifest(stored, dict(stored)) == []
    with pytest.raises(ManifestMismatch, match="vae_weights_sha256: stored 'w1', now 'w2'"):
        check_manifest(stored, {**stored, "vae_weights_sha256": "w2"}, allow_code_change=True, allow_input_change=True)
    with pytest.raises(ManifestMismatch, match=r"input: stored '/data/a', now '/data/b' \(or pass --allow-input-change"):
        check_manifest(stored, {**stored, "input": "/data/b"})
    with pytest.raises(ManifestMismatch, match="code_sha256.*--allow-code-change"):
        check_manifest(stored, {**stored, "code_sha256": "c2"}, allow_input_change=True)
    notes = check_manifest(stored, {**stored, "code_sha256": "c2", "input": "/data/b"}, allow_code_change=True,
                           allow_input_change=True)
    assert len(notes) == 2 and "code_sha256 changed (allow_code_change)" in notes[1]
    # a manifest written before the guards: resumable, each guard recorded now with a note
    old = {k: v for k, v in stored.items() if k not in GUARDS}
    notes = check_manifest(old, dict(stored))
    assert [n.split(":")[0] for n in notes] == [f"the stored manifest has no {f}" for f in GUARDS]
    # hub weights not on this machine: not compared, the stored digest kept
    new = {**stored, "vae_weights_sha256": None}
    assert "not checked" in check_manifest(stored, new)[0] and new["vae_weights_sha256"] == "w1"


def test_weights_and_code_digests(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    assert vae_weights_digest(str(tmp_path / "vae")) is None  # no weight files
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights 1")
    first = vae_weights_digest(str(tmp_path / "vae"))
    (tmp_path / "vae" / "config.json").write_text('{"a": 1}')  # not a weight file
    assert vae_weights_digest(str(tmp_path / "vae")) == first
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights 2")
    assert vae_weights_digest(str(tmp_path / "vae")) not in (first, None)
    assert vae_weights_digest("nobody/not-in-the-hub-cache") is None  # offline, nothing downloaded
    assert len(code_digest()) == 64 and code_digest() == code_digest()


def test_done_keys_carry_the_source_sha256(tmp_path):
    table = _rows(("latent", "a", 32, None), ("latent", "b", 32, None), ("error", "b", 64, "too_small"))
    table = table.set_column(table.schema.get_field_index("sha256"), "sha256",
                             pa.array(["sa", "", None], pa.string()))
    LatentWriter(FS, str(tmp_path)).write(table)
    assert done_keys(FS, str(tmp_path), [32, 64]) == {32: {"a": "sa", "b": None}, 64: {"b": None}}


def test_folder_units_with_sidecars_and_nesting(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "a.txt").write_text("caption a\n")
    (tmp_path / "sub" / "b.PNG").write_bytes(b"y")
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".hidden.jpg").write_bytes(b"z")
    fmt, units = list_units(FS, str(tmp_path))
    assert fmt == "folder" and [u.key for u in units] == ["a.jpg", "notes.md", "sub/b.PNG"]
    (row,) = read_unit(FS, units[0])
    assert row["caption"] == "caption a" and row["caption_source"] == "sidecar" and row["data"] == b"x"
    (row,) = read_unit(FS, units[2])
    assert row["caption"] == "" and row["caption_source"] == "none"


def test_img2dataset_parquet_rows_and_failures(tmp_path):
    pq.write_table(pa.Table.from_pylist([
        {"key": "000", "jpg": b"img", "txt": "cap", "status": "success", "error_message": None, "url": "http://x/0"},
        {"key": "001", "jpg": None, "txt": None, "status": "failed_to_download", "error_message": "404",
         "url": "http://x/1"},
    ]), tmp_path / "00000.parquet")
    fmt, units = list_units(FS, str(tmp_path))
    assert fmt == "parquet"
    ok, failed = list(read_unit(FS, units[0]))
    assert ok["kind"] == "item" and ok["key"] == "000" and ok["caption"] == "cap" and ok["source"] == "http://x/0"
    assert failed["kind"] == "error" and failed["stage"] == "input" and failed["reason"] == "failed_to_download: 404"
    assert failed["reason_code"] == "failed_to_download"


def test_webdataset_tar_and_unreadable_shard(tmp_path):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in [("000.jpg", b"img0"), ("000.txt", b"cap0"), ("000.json", json.dumps({"url": "u0"}).encode()),
                           ("001.png", b"img1")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "00001.tar").write_bytes(b"\x01" * 100)
    fmt, units = list_units(FS, str(tmp_path))
    assert fmt == "webdataset" and len(units) == 2
    rows = list(read_unit(FS, units[0]))
    assert [(r["key"], r["data"], r["caption"], r["source"]) for r in rows] == [
        ("000", b"img0", "cap0", "u0"), ("001", b"img1", "", f"{units[0].path}#001")]
    (broken,) = read_unit(FS, units[1])
    assert broken["kind"] == "error" and broken["reason"].startswith("unreadable_shard")
    assert broken["reason_code"] == ReasonCode.UNREADABLE_SHARD


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_units(FS, str(tmp_path / "nope"))
    (row,) = read_unit(FS, Unit("zip", "x"))  # whatever goes wrong with a unit becomes its error row
    assert row["kind"] == "error" and "unknown unit kind" in row["reason"]
