"""Inputs that fail or kill their worker (issue 17, item 5): each costs its own error row, the rest of its batch
is processed, and no retry is endless. Faults are injected through HDM_FAULTS (pipelines/faults.py): a worker
really dies by SIGKILL, the VAE really raises torch.OutOfMemoryError."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from PIL import Image

from pipelines.data.attempts import JOURNAL_DIR, MAX_KILLERS_PER_BATCH, JournalSpec, ray_retry_args
from pipelines.data.encode import BatchEncoder
from pipelines.data.images import TransformSpec
from pipelines.data.latent_store import ReasonCode
from pipelines.data.stages import STREAM_SCHEMA, CaptionStage, PrepareStage
from pipelines.faults import ENV

from tests.pipelines.helpers import ROOT
from tests.tiny_models import make_tiny_captioner, make_tiny_vae

pytestmark = pytest.mark.chaos
KEYS = ["a.png", "b.png", "c.png", "d.png"]


def _png(seed: int, size: int = 32) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _items() -> pa.Table:
    rows = [{"kind": "item", "key": k, "source": k, "data": _png(i), "caption": "a thing", "caption_source": "input",
             "todo": [32]} for i, k in enumerate(KEYS)]
    return pa.Table.from_pylist(rows, schema=STREAM_SCHEMA)


def _faults(monkeypatch, spec: dict) -> None:
    monkeypatch.setenv(ENV, json.dumps(spec))


def test_a_transform_error_costs_its_image_only(monkeypatch):
    _faults(monkeypatch, {"prepare.raise": ["b.png"]})
    out = PrepareStage(TransformSpec(max_aspect=3.0), 10**8, want_thumbnail=False)(_items()).to_pylist()
    errors = {r["key"]: r for r in out if r["kind"] == "error"}
    assert set(errors) == {"b.png"} and errors["b.png"]["reason_code"] == ReasonCode.TRANSFORM_FAILED
    assert "injected fault prepare.raise" in errors["b.png"]["reason"]
    assert sorted(r["key"] for r in out if r["kind"] == "item") == ["a.png", "c.png", "d.png"]


def test_an_encoder_out_of_memory_splits_the_batch_down_to_the_image(tmp_path, monkeypatch):
    prepared = PrepareStage(TransformSpec(max_aspect=3.0), 10**8, want_thumbnail=False)(_items())
    encoder = BatchEncoder(str(make_tiny_vae(tmp_path / "vae")), device="cpu", batch_size=4, store_std=True)
    clean = {r["key"]: r for r in encoder(prepared).to_pylist()}
    _faults(monkeypatch, {"encode.oom": ["c.png"]})
    out = encoder(prepared).to_pylist()
    errors = [r for r in out if r["kind"] == "error"]
    assert [(r["key"], r["reason_code"], r["res"]) for r in errors] == [("c.png", ReasonCode.ENCODE_FAILED, 32)]
    assert "OutOfMemoryError" in errors[0]["reason"]
    latents = {r["key"]: r for r in out if r["kind"] == "latent"}
    assert sorted(latents) == ["a.png", "b.png", "d.png"]
    for key, row in latents.items():  # encoded in smaller groups, the same latents
        a = np.frombuffer(row["latent"], np.float16)
        b = np.frombuffer(clean[key]["latent"], np.float16)
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3)


def test_a_caption_failure_costs_its_image_only(tmp_path, monkeypatch):
    prepared = PrepareStage(TransformSpec(max_aspect=3.0), 10**8, want_thumbnail=True)(_items())
    stage = CaptionStage(str(make_tiny_captioner(tmp_path / "cap")), "replace", 8, False)
    _faults(monkeypatch, {"caption.raise": ["a.png"]})
    out = stage(prepared).to_pylist()
    assert [(r["key"], r["reason_code"]) for r in out if r["kind"] == "error"] == [("a.png", ReasonCode.CAPTION_FAILED)]
    captioned = [r for r in out if r["kind"] == "item"]
    assert len(captioned) == 3 and all(r["caption_source"] == "model" and r["thumb"] is None for r in captioned)


_ATTEMPT = """
import json, sys
import pyarrow.fs as pafs, pyarrow.parquet as pq
from pipelines.data.attempts import JournalSpec
from pipelines.data.images import TransformSpec
from pipelines.data.stages import PrepareStage
journal = JournalSpec(pafs.LocalFileSystem(), sys.argv[2], 2)
out = PrepareStage(TransformSpec(max_aspect=3.0), 10**8, False, journal=journal)(pq.read_table(sys.argv[1]))
print(json.dumps([[r["key"], r["kind"], r["reason_code"]] for r in out.to_pylist()]))
"""


def test_a_worker_killing_input_ends_as_one_error_row_in_bounded_attempts(tmp_path):
    """The same batch run again after each death, as Ray retries a task: the journal finds the input that kills
    the worker and, after max_attempts (2) deaths on it alone, writes it off; the others are prepared."""
    import pyarrow.parquet as pq

    pq.write_table(_items(), tmp_path / "batch.parquet")
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{ENV: json.dumps({"prepare.kill": ["c.png"]})})
    outcomes = []
    for _ in range(1 + 2 * MAX_KILLERS_PER_BATCH):  # the most retries ray_retry_args allows
        done = subprocess.run([sys.executable, "-c", _ATTEMPT, str(tmp_path / "batch.parquet"), str(tmp_path / "out")],
                              env=env, capture_output=True, text=True, timeout=120)
        outcomes.append(done.returncode)
        if done.returncode == 0:
            break
    assert outcomes == [-signal.SIGKILL] * 3 + [0], done.stderr[-2000:]  # the batch, then c.png alone twice
    out = json.loads(done.stdout)
    assert ["c.png", "error", ReasonCode.WORKER_CRASHED] in out
    assert sorted(k for k, kind, _ in out if kind == "item") == ["a.png", "b.png", "d.png"]
    left = pafs.LocalFileSystem().get_file_info(pafs.FileSelector(str(tmp_path / "out" / JOURNAL_DIR),
                                                                  allow_not_found=True))
    assert not [p for p in left if p.type == pafs.FileType.File]  # nothing left marked


def test_ray_retries_are_bounded():
    assert ray_retry_args(2, actor=False) == {"max_retries": 1 + 2 * MAX_KILLERS_PER_BATCH}
    assert ray_retry_args(2, actor=True) == {"max_task_retries": 1 + 2 * MAX_KILLERS_PER_BATCH}
    assert JournalSpec(pafs.LocalFileSystem(), "/x").max_attempts == 2
