"""Unit checks of the precompute job's planning and of how a CPU encoder sizes its threads (no cluster)."""

from __future__ import annotations

import hashlib
import io
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.cluster import CoreShare, cpu_marks
from pipelines.data.images import TransformSpec
from pipelines.data.latent_store import ReasonCode
from pipelines.data.precompute import default_encoders, inputs_to_do
from pipelines.data.sources import Unit
from pipelines.data.stages import STREAM_SCHEMA, PrepareStage, ReadStage


@pytest.mark.parametrize(("resources", "gpus", "captioners", "blocks", "expected"), [
    ({"CPU": 2.0}, 0.0, 0, 100, 2),  # one per core
    ({"CPU": 2.0}, 0.0, 0, 1, 1),  # one img2dataset shard is one block: one encoder can work on it
    ({"CPU": 8.0}, 0.0, 2, 100, 6),  # cores left by CPU captioners
    ({"CPU": 1.0}, 0.0, 2, 100, 1),  # never none
    ({"CPU": 16.0, "GPU": 4.0}, 1.0, 0, 100, 4),  # one per GPU
    ({"CPU": 16.0, "GPU": 4.0}, 0.5, 0, 100, 8),
    ({"CPU": 16.0, "GPU": 4.0}, 1.0, 0, 3, 3),
])
def test_default_encoders(resources, gpus, captioners, blocks, expected):
    assert default_encoders(resources, gpus, cpu_captioners=captioners, blocks=blocks) == expected


def test_inputs_to_do_is_the_progress_total(tmp_path):
    """The total of the job's progress lines: inputs less keys done at every resolution (an error stays done);
    shards by their parquet footers, a broken one as one input; unknown for a tar without its metadata."""
    fs = pafs.LocalFileSystem()
    done = {32: {"a": "sha", "b": None, "c": "sha"}, 64: {"a": "sha", "c": None}}  # a and c done everywhere
    files = [Unit("file", f"/in/{k}", key=k) for k in "abcd"]
    assert inputs_to_do(fs, "folder", files, done, limit=None) == 2
    assert inputs_to_do(fs, "folder", files, done, limit=1) == 1
    for name, rows in (("0.parquet", 3), ("1.parquet", 2)):
        pq.write_table(pa.table({"key": [f"{name}{i}" for i in range(rows)]}), tmp_path / name)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    shards = [Unit("parquet", str(tmp_path / n)) for n in ("0.parquet", "1.parquet", "broken.parquet")]
    assert inputs_to_do(fs, "parquet", shards, done, limit=None) == 3 + 2 + 1 - 2
    tars = [Unit("tar", str(tmp_path / "0.tar"), sidecar=str(tmp_path / "0.parquet"))]
    assert inputs_to_do(fs, "webdataset", tars, {32: {}}, limit=None) == 3
    assert inputs_to_do(fs, "webdataset", [*tars, Unit("tar", str(tmp_path / "1.tar"))], done, limit=None) is None


def test_core_share_takes_the_cores_the_rest_of_the_node_leaves_idle():
    # (seconds, node busy CPU-seconds, this process's CPU-seconds) as /proc/stat and process_time would give them
    marks = iter([(0, 0, 0),
                  (10, 20, 10),  # the other encoder kept the second core busy: 1 thread
                  (20, 32, 20),  # it ran out of work (0.2 cores of Ray's own processes left): both cores
                  (20.5, 33, 20.5),  # too short a window to tell: unchanged
                  (30, 52, 37),  # still alone (on 2 threads it used 1.7 cores): stays on 2
                  (40, 72, 48),  # the other is back: 1
                  None])  # /proc/stat unreadable: unchanged
    share = CoreShare(start=1, marks=lambda: next(marks), cores=2)
    assert [share.update() for _ in range(6)] == [1, 2, 2, 2, 1, 1]
    assert CoreShare(start=3, marks=lambda: None, cores=8).update() == 3


def test_cpu_marks_count_this_process_within_the_node():
    before = cpu_marks()
    t = time.process_time()
    while time.process_time() - t < 0.3:
        pass
    after = cpu_marks()
    wall, busy, mine = (a - b for a, b in zip(after, before))
    assert mine >= 0.29 and wall >= mine * 0.9
    assert busy >= mine - 0.05  # the node's busy time includes ours (to a clock tick)


def test_prepare_stage_error_rows_carry_their_reason_code():
    """What the decode stage passes on (to the encoder, or to EQ-VAE's error log) has `reason_code` beside the
    full `reason` text."""
    png = io.BytesIO()
    Image.new("RGB", (40, 40), "red").save(png, format="PNG")
    items = [{"kind": "item", "key": "empty", "source": "s", "data": b"", "todo": [32]},
             {"kind": "item", "key": "small", "source": "s", "data": png.getvalue(), "todo": [32, 64]}]
    stage = PrepareStage(TransformSpec(max_aspect=3.0), max_pixels=10**6, want_thumbnail=False)
    out = stage(pa.Table.from_pylist(items, schema=STREAM_SCHEMA)).to_pylist()
    assert [(r["kind"], r["key"], r["stage"], r["reason_code"], r["err_res"]) for r in out] == [
        ("error", "empty", "decode", ReasonCode.EMPTY_FILE, None), ("item", "small", None, None, None),
        ("error", "small", "resize", ReasonCode.TOO_SMALL, 64)]
    assert out[0]["reason"] == "empty_file" and out[2]["reason"] == "too_small: short side 40 px < 64"


def test_read_stage_redoes_a_key_whose_source_changed(tmp_path):
    """Resume compares the stored sha256 (latent_store.done_keys) with the bytes read now: a key whose latent
    was made from other bytes is done again, one that ended in an error row is not."""
    data = {}
    for key in ("same.png", "changed.png", "failed.png", "new.png"):
        png = io.BytesIO()
        Image.new("RGB", (40, 40), (len(key), 0, 0)).save(png, format="PNG")
        (tmp_path / key).write_bytes(data.setdefault(key, png.getvalue()))
    sha = {key: hashlib.sha256(b).hexdigest() for key, b in data.items()}
    done = {32: {"same.png": sha["same.png"], "changed.png": "0" * 64, "failed.png": None},
            64: {"same.png": sha["same.png"], "changed.png": sha["changed.png"], "failed.png": None}}
    units = [{"kind": "file", "path": str(tmp_path / key), "key": key, "sidecar": ""} for key in sorted(data)]
    assert sorted(units[0]) == sorted(Unit.__dataclass_fields__)
    out = ReadStage(pafs.LocalFileSystem(), [32, 64], done)(pa.Table.from_pylist(units)).to_pylist()
    assert {r["key"]: r["todo"] for r in out} == {"changed.png": [32], "new.png": [32, 64]}
    assert all(r["sha256"] == sha[r["key"]] for r in out)
    fresh = ReadStage(pafs.LocalFileSystem(), [32], {32: {}})(pa.Table.from_pylist(units)).to_pylist()
    assert len(fresh) == 4  # the EQ-VAE job reads everything
