"""Inputs that fail or kill their worker (issue 17, item 5): each costs its own error row, the rest of its batch
is processed, and no retry is endless. Faults are injected through HDM_FAULTS (pipelines/faults.py): a worker
really dies by SIGKILL, the VAE really raises torch.OutOfMemoryError."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from PIL import Image

from pipelines.config import S3Options
from pipelines.data.attempts import (JOURNAL_DIR, MAX_KILLERS_PER_BATCH, JournalSpec, guarded,
                                     ray_retry_args)
from pipelines.data.encode import BatchEncoder
from pipelines.data.images import TransformSpec
from pipelines.data.latent_store import ReasonCode
from pipelines.data.sources import list_units
from pipelines.data.stages import STREAM_SCHEMA, CaptionStage, EncodeStage, PrepareStage, ReadStage
from pipelines.faults import ENV
from pipelines.storage import join, s3_filesystem

from tests.pipelines.helpers import ROOT, ray_job_submit, read_parts
from tests.tiny_models import make_tiny_captioner, make_tiny_vae

pytestmark = pytest.mark.chaos
KEYS = ["a.png", "b.png", "c.png", "d.png"]


def _png(seed: int, size: int = 32) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _items() -> pa.Table:
    rows = [{"kind": "item", "key": k, "source": k, "data": _png(i), "sha256": hashlib.sha256(_png(i)).hexdigest(),
             "caption": "a thing", "caption_source": "input", "todo": [32]} for i, k in enumerate(KEYS)]
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


@pytest.mark.parametrize(("killers", "deaths"), [(["c.png"], 3), (["b.png", "d.png"], 5)])
def test_a_worker_killing_input_ends_as_one_error_row_in_bounded_attempts(tmp_path, killers, deaths):
    """The same batch run again after each death, as Ray retries a task: the journal finds each input that kills
    the worker and, after max_attempts (2) deaths on it alone, writes it off; the others are prepared. One
    death for the batch, then two per such input: an input written off is not tried again when the worker dies
    on a later one."""
    import pyarrow.parquet as pq

    pq.write_table(_items(), tmp_path / "batch.parquet")
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{ENV: json.dumps({"prepare.kill": killers})})
    outcomes = []
    for _ in range(1 + ray_retry_args(2, actor=False)["max_retries"]):  # the first try and Ray's retries
        done = subprocess.run([sys.executable, "-c", _ATTEMPT, str(tmp_path / "batch.parquet"), str(tmp_path / "out")],
                              env=env, capture_output=True, text=True, timeout=120)
        outcomes.append(done.returncode)
        if done.returncode == 0:
            break
    assert outcomes == [-signal.SIGKILL] * deaths + [0], done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert sorted(k for k, kind, code in out if kind == "error" and code == ReasonCode.WORKER_CRASHED) == killers
    assert sorted(k for k, kind, _ in out if kind == "item") == sorted(set(KEYS) - set(killers))
    assert _marks_left(tmp_path / "out") == []


class _Died(BaseException):
    """Stands for the death of the worker: nothing after it in the attempt runs, as after a SIGKILL."""


def _journal_until_done(journal: JournalSpec, killers: set[str]) -> tuple[int, list[dict]]:
    """Run one batch through attempts.guarded as Ray would retry its task: (deaths, rows of the last attempt)."""
    def process(items):
        if killers & {i["key"] for i in items}:
            raise _Died
        return [{**i, "kind": "item"} for i in items]

    crashed = lambda item, detail: [{**item, "kind": "error", "reason": detail}]  # noqa: E731
    for deaths in range(1 + ray_retry_args(journal.max_attempts, actor=False)["max_retries"]):
        try:
            return deaths, guarded(journal, "prepare", [{"key": k} for k in KEYS], process, crashed=crashed)
        except _Died:
            continue
    raise AssertionError("the retries ran out")


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.integration)])
def test_the_journal_on_local_and_s3_storage(where, tmp_path, request):
    if where == "s3":
        endpoint = request.getfixturevalue("s3_server")["HDM_S3_ENDPOINT"]
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="journal")
        fs, root = s3_filesystem(S3Options(endpoint_url=endpoint)), "journal/out"
    else:
        fs, root = pafs.LocalFileSystem(), str(tmp_path / "out")
    deaths, rows = _journal_until_done(JournalSpec(fs, root, max_attempts=3), {"a.png", "d.png"})
    assert deaths == 1 + 2 * 3
    assert [(r["key"], r["kind"]) for r in rows] == [("a.png", "error"), ("b.png", "item"), ("c.png", "item"),
                                                     ("d.png", "error")]
    assert rows[0]["reason"] == "its prepare worker died on each of 3 attempts"
    left = fs.get_file_info(pafs.FileSelector(join(root, JOURNAL_DIR), allow_not_found=True, recursive=True))
    assert [i.path for i in left if i.type == pafs.FileType.File] == []
    assert _journal_until_done(JournalSpec(fs, root), set()) == (0, [{"key": k, "kind": "item"} for k in KEYS])


def _marks_left(out) -> list[str]:
    left = pafs.LocalFileSystem().get_file_info(pafs.FileSelector(str(out / JOURNAL_DIR), allow_not_found=True))
    return [p.path for p in left if p.type == pafs.FileType.File]


def test_ray_retries_are_bounded():
    bound = 1 + 2 * MAX_KILLERS_PER_BATCH  # the batch, then max_attempts deaths for each worker-killing input
    assert ray_retry_args(2, actor=False) == {"max_retries": bound}
    assert ray_retry_args(2, actor=True) == {"max_restarts": -1, "max_task_retries": bound}
    assert JournalSpec(pafs.LocalFileSystem(), "/x").max_attempts == 2


def _run_with_deadline(fn, seconds: float):
    """fn() in a thread; fails the test if it has not returned after `seconds` (a retry loop never ends)."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.mark.integration
def test_inputs_that_kill_their_ray_workers_end_as_error_rows(tmp_path, ray_driver):
    """A real Ray Data job of the stages (read + prepare as tasks, encode on a pool actor) with the retry bounds
    of ray_retry_args: c.png SIGKILLs its prepare task's worker on every try, e.png its encoder actor. The job
    ends (Ray alone would retry them forever), each of them is one WORKER_CRASHED row and every other image,
    its batch neighbours included, a latent row."""
    import ray

    keys = ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]
    (tmp_path / "in").mkdir()
    for i, key in enumerate(keys):
        (tmp_path / "in" / key).write_bytes(_png(i))
    fs, vae = pafs.LocalFileSystem(), make_tiny_vae(tmp_path / "vae")
    journal = JournalSpec(fs, str(tmp_path / "out"), max_attempts=2)
    env = {"env_vars": {ENV: json.dumps({"prepare.kill": ["c.png"], "encode.kill": ["e.png"]})}}
    tasks = dict(batch_format="pyarrow", num_cpus=0.5, runtime_env=env, **ray_retry_args(2, actor=False))
    units = [dataclasses.asdict(u) for u in list_units(fs, str(tmp_path / "in")).units]
    ds = ray.data.from_items(units, override_num_blocks=1)
    ds = ds.map_batches(ReadStage(fs, [32], {32: {}}), batch_size=6, **tasks)
    ds = ds.map_batches(PrepareStage(TransformSpec(max_aspect=3.0), 10**8, False, journal=journal), batch_size=3,
                        **tasks)
    ds = ds.map_batches(EncodeStage, fn_constructor_kwargs=dict(vae=str(vae), use_gpu=False, threads=1, actors=1,
                                                                batch_size=3, store_std=False, journal=journal),
                        compute=ray.data.ActorPoolStrategy(size=1), batch_size=3, batch_format="pyarrow",
                        num_cpus=0.5, runtime_env=env, **ray_retry_args(2, actor=True))
    rows = _run_with_deadline(ds.take_all, 400)
    errors = [(r["key"], r["stage"], r["reason_code"], r["res"]) for r in rows if r["kind"] == "error"]
    assert sorted(errors) == [("c.png", "prepare", ReasonCode.WORKER_CRASHED, None),
                              ("e.png", "encode", ReasonCode.WORKER_CRASHED, 32)]
    latents = sorted(r["key"] for r in rows if r["kind"] == "latent")
    assert latents == ["a.png", "b.png", "d.png", "f.png"]  # each once
    assert _marks_left(tmp_path / "out") == []


@pytest.mark.integration
def test_the_precompute_job_survives_inputs_that_kill_its_workers(ray_cluster, tmp_path):
    """jobs/precompute_latents.py submitted as users do, HDM_FAULTS in the job's runtime env: c.png kills its
    prepare worker, e.png its encoder, on every try. The job finishes (a hang fails on the submit's timeout);
    each of them is one WORKER_CRASHED error row, every other image one latent row."""
    keys = ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]
    (tmp_path / "in").mkdir()
    for i, key in enumerate(keys):
        (tmp_path / "in" / key).write_bytes(_png(i))
    vae, out = make_tiny_vae(tmp_path / "vae"), tmp_path / "out"
    faults = {"prepare.kill": ["c.png"], "encode.kill": ["e.png"]}
    result = ray_job_submit(ray_cluster, ["jobs/precompute_latents.py", "--input", str(tmp_path / "in"), "--output",
                                          str(out), "--res", "32", "--vae", str(vae), "--batch-size", "3"],
                            env_vars={ENV: json.dumps(faults)}, timeout=420)
    assert result.returncode == 0, result.output[-4000:]
    fs = pafs.LocalFileSystem()
    errors = sorted((r["key"], r["stage"], r["reason_code"]) for r in read_parts(fs, str(out / "errors")))
    assert errors == [("c.png", "prepare", ReasonCode.WORKER_CRASHED), ("e.png", "encode", ReasonCode.WORKER_CRASHED)]
    assert sorted(r["key"] for r in read_parts(fs, str(out / "res=32"))) == ["a.png", "b.png", "d.png", "f.png"]
    assert _marks_left(out) == []
