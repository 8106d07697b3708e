"""MLflow tracking (pipelines/tracking.py, pipelines/tracking_buffer.py) without a server process: sqlite stores,
closed ports and a socket that never answers stand for the server's states; the outage with a real server that
stops and restarts is tests/pipelines/train/test_mlflow_outage.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from pipelines.tracking import (HTTP_DEFAULTS, StageRun, Terminated, TrackingUnavailable, _client, check_reachable)
from pipelines.tracking_buffer import MetricBuffer

ROOT = Path(__file__).resolve().parents[2]
SECRET = "hdm-fake-secret-7f3a9c"  # in the environment under a secret-looking name: redact() masks it


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def sqlite_uri(tmp_path) -> str:
    (tmp_path / "db").mkdir()
    return f"sqlite:///{tmp_path}/db/mlflow.db"


def _open(uri: str, key: str = "k") -> StageRun:
    return StageRun.open(tracking_uri=uri, experiment="exp", stage_key=key, run_name="n")


def _steps(uri: str, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_sqlite_store_keeps_artifacts_beside_the_database(tmp_path, monkeypatch, sqlite_uri):
    monkeypatch.chdir(tmp_path)  # MLflow's own default would be ./mlruns here
    run = _open(sqlite_uri)
    note = tmp_path / "note.txt"
    note.write_text("hi")
    run.log_artifact(note, "notes")
    stored = [p.relative_to(tmp_path) for p in tmp_path.rglob("note.txt") if p != note]
    assert stored == [Path("db", "artifacts", "exp", run.run_id, "artifacts", "notes", "note.txt")]
    again = StageRun.find(tracking_uri=sqlite_uri, experiment="exp", stage_key="k")
    assert again.run_id == run.run_id and again.state().status == "RUNNING"


# ---------------------------------------------------------------------------------------------------
# check_reachable

def test_a_local_store_is_always_reachable(sqlite_uri):
    check_reachable(sqlite_uri, timeout_s=0.1)


def test_a_closed_port_is_unreachable_at_once_naming_the_uri():
    uri = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=f"{uri} is unreachable"):
        check_reachable(uri, timeout_s=2.0)
    assert time.monotonic() - start < 2.0


def test_a_server_that_never_answers_is_unreachable_within_the_timeout():
    """A listening socket that accepts and says nothing (a hung server, a dead port-forward)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(TrackingUnavailable, match="unreachable"):
            check_reachable(uri, timeout_s=1.0)
        assert 0.9 < time.monotonic() - start < 5.0


# ---------------------------------------------------------------------------------------------------
# Redaction of everything a run receives

def test_tags_text_and_text_artifacts_are_redacted_binary_files_pass(tmp_path, monkeypatch, sqlite_uri):
    monkeypatch.setenv("HDM_TEST_API_TOKEN", SECRET)
    run = _open(sqlite_uri)
    run.set_tags({"hdm.dag.error": f"job failed: token={SECRET}", "uri": "postgresql://u:pw12345@db/x"})
    run.log_text(f"line with {SECRET}\n", "logs/inline.txt")
    for name in ("stage.log", "config.json", "cfg.toml", "notes.yaml"):
        (tmp_path / name).write_text(f"{name}: {SECRET}\n")
        run.log_artifact(tmp_path / name, "logs")
    (tmp_path / "weights.bin").write_bytes(SECRET.encode())  # not text: stored as it is
    run.log_artifact(tmp_path / "weights.bin", "raw")
    tags = run.state().tags
    assert tags["hdm.dag.error"] == "job failed: token=***" and tags["uri"] == "postgresql://u:***@db/x"
    stored = {p.name: p.read_text() for p in (tmp_path / "db" / "artifacts").rglob("*") if p.is_file()}
    assert set(stored) == {"inline.txt", "stage.log", "config.json", "cfg.toml", "notes.yaml", "weights.bin"}
    assert stored["stage.log"] == "stage.log: ***\n" and stored["inline.txt"] == "line with ***\n"
    assert [n for n, text in stored.items() if SECRET in text] == ["weights.bin"]


# ---------------------------------------------------------------------------------------------------
# The buffer: never blocking, bounded, in order, a resend idempotent

def test_mlflow_store_keeps_one_row_of_a_batch_sent_twice(sqlite_uri):
    """What makes a resend safe: the same (key, timestamp, step, value) sent again is not a second row."""
    run = _open(sqlite_uri)
    points = [Metric("loss", 1.0 / s, 1_700_000_000_000 + s, s) for s in (1, 2, 3)]
    run.client.log_batch(run.run_id, metrics=points)
    run.client.log_batch(run.run_id, metrics=points + [Metric("loss", 0.2, 1_700_000_000_004, 4)])
    assert _steps(sqlite_uri, run.run_id) == [1, 2, 3, 4]


def test_a_worker_run_never_raises_nor_blocks_while_the_server_is_down():
    uri = f"http://127.0.0.1:{_closed_port()}"
    run = StageRun.attach(tracking_uri=uri, run_id="0" * 32, worker=True)
    start = time.monotonic()
    for step in range(1, 101):
        run.log_metrics({"loss": 1.0, "lr": 0.1}, step=step)
    run.set_tags({"hdm.resumed_at_step": 5})
    run.log_image(__import__("numpy").zeros((4, 4, 3), "uint8"), "samples/x.png")  # tried once, printed
    run.log_params({"a": 1})
    assert time.monotonic() - start < 30
    assert run.flush(timeout_s=0.5) == 201  # 200 points and a tag still waiting
    assert "127.0.0.1" in (run._buffer.last_error or "")


def test_a_full_buffer_drops_the_oldest_and_counts_them():
    buffer = MetricBuffer(lambda metrics, tags: (_ for _ in ()).throw(ConnectionError("down")), capacity=10)
    buffer.add([Metric("loss", 0.0, 0, s) for s in range(1, 26)])
    time.sleep(0.2)
    assert buffer.dropped == 15 and buffer.pending == 10  # steps 16..25 kept (in flight, retried)
    assert [m.step for m in buffer.inflight[0]] == list(range(16, 26))
    sent: list = []
    ok = MetricBuffer(lambda metrics, tags: sent.extend(m.step for m in metrics), capacity=10)
    ok.add([Metric("loss", 0.0, 0, s) for s in range(1, 6)])
    assert ok.flush(5.0) == 0 and sent == [1, 2, 3, 4, 5] and ok.dropped == 0


def test_points_arrive_in_order_each_once_after_failed_attempts(sqlite_uri, monkeypatch):
    """The sender keeps a failed batch and sends it again (same stamps): the history has every step once."""
    import pipelines.tracking_buffer as tb

    monkeypatch.setattr(tb, "FIRST_WAIT_S", 0.05)
    monkeypatch.setattr(tb, "BATCH", 7)
    run = _open(sqlite_uri)
    failures = {"left": 3}

    def flaky(metrics, tags):
        run.client.log_batch(run.run_id, metrics=metrics)  # delivered, but the answer "lost" three times
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("answer lost")

    buffer = MetricBuffer(flaky)
    buffer.add([Metric("loss", float(s), 1_700_000_000_000 + s, s) for s in range(1, 31)])
    assert buffer.flush(10.0) == 0 and failures["left"] == 0
    assert _steps(sqlite_uri, run.run_id) == list(range(1, 31))


def test_batches_keep_to_mlflows_limits_with_tags_waiting(sqlite_uri):
    """log_batch takes 1000 entities at most, tags included: points and tags queued together all arrive."""
    run = _open(sqlite_uri)
    worker = StageRun.attach(tracking_uri=sqlite_uri, run_id=run.run_id, worker=True)
    worker.set_tags({f"t{i}": i for i in range(150)})
    for step in range(1, 2501):
        worker.log_metrics({"loss": 1.0}, step=step)
    worker.close(timeout_s=60)
    assert worker._buffer.dropped == 0 and worker._buffer.last_error is None
    assert _steps(sqlite_uri, run.run_id) == list(range(1, 2501))
    assert {f"t{i}" for i in range(150)} <= set(run.state().tags)


def test_a_resumed_worker_logs_only_the_steps_after_the_history(sqlite_uri):
    run = _open(sqlite_uri)
    for step in range(1, 8):
        run.log_metrics({"loss": 1.0, "lr": 0.1}, step=step)
    resumed = StageRun.attach(tracking_uri=sqlite_uri, run_id=run.run_id, worker=True, resume_metric="loss")
    for step in range(6, 11):  # from the checkpoint at step 5
        resumed.log_metrics({"loss": 0.5, "lr": 0.1}, step=step)
    resumed.close(timeout_s=10)
    assert _steps(sqlite_uri, run.run_id) == list(range(1, 11)) == _steps(sqlite_uri, run.run_id, "lr")
    assert resumed._buffer.skipped == 4  # steps 6 and 7, two metrics each
    # A fresh start of a later job (no checkpoint) counts only what it logged itself: it appends anew
    fresh = StageRun.attach(tracking_uri=sqlite_uri, run_id=run.run_id, worker=True, resume_metric="loss",
                            logged_since_ms=int(time.time() * 1000) + 1)
    fresh.log_metrics({"loss": 0.9}, step=1)
    fresh.close(timeout_s=10)
    assert _steps(sqlite_uri, run.run_id) == [1, *range(1, 11)]


# ---------------------------------------------------------------------------------------------------
# The driver: retried, then TrackingUnavailable; runs never left RUNNING

def test_driver_calls_give_up_after_their_patience():
    uri = f"http://127.0.0.1:{_closed_port()}"
    run = StageRun(_client(uri), "0" * 32, patience_s=2.0)
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="set_tags"):
        run.set_tags({"a": "b"})
    with pytest.raises(TrackingUnavailable, match="KILLED"):
        run.finish("KILLED")
    assert time.monotonic() - start < 30


def test_http_retry_defaults_never_override_the_users(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    _client("http://127.0.0.1:1")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"]


@pytest.mark.parametrize("error, status", [(ValueError("bad"), "FAILED"), (Terminated("signal 15"), "KILLED"),
                                           (KeyboardInterrupt(), "KILLED")])
def test_an_error_in_the_block_ends_the_run(sqlite_uri, error, status):
    run = _open(sqlite_uri)
    with pytest.raises(type(error)):
        with run.ending_on_error():
            raise error
    assert run.state().status == status


def test_nested_blocks_mark_the_run_once(sqlite_uri, monkeypatch):
    """`fit`'s block inside the job's: the inner one marks the run, the outer one passes the error on."""
    run = _open(sqlite_uri)
    marked: list[str] = []
    set_terminated = run.client.set_terminated
    monkeypatch.setattr(run.client, "set_terminated",
                        lambda run_id, status: (marked.append(status), set_terminated(run_id, status=status)))
    with pytest.raises(Terminated):
        with run.ending_on_error(), run.ending_on_error():
            raise Terminated("signal 15")
    assert marked == ["KILLED"] and run.state().status == "KILLED"


def test_sigterm_marks_the_run_killed(tmp_path, sqlite_uri):
    """A real process, a real SIGTERM (what `ray job stop` sends): the handler raises in the main thread,
    the run ends KILLED."""
    ready = tmp_path / "ready"
    script = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from pipelines.tracking import StageRun, raise_on_sigterm, Terminated
raise_on_sigterm()
run = StageRun.open(tracking_uri={sqlite_uri!r}, experiment="exp", stage_key="term", run_name="n")
try:
    with run.ending_on_error():
        open({str(ready)!r}, "w").write(run.run_id)
        time.sleep(120)
except Terminated:
    sys.exit(143)
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    run_id = ready.read_text()
    assert MlflowClient(sqlite_uri).get_run(run_id).info.status == "KILLED"


def test_params_are_redacted_and_a_reopened_run_keeps_its_own(monkeypatch, sqlite_uri):
    monkeypatch.setenv("HDM_TEST_API_TOKEN", SECRET)
    run = _open(sqlite_uri)
    run.log_params({"s3": {"endpoint": f"http://x/{SECRET}"}, "steps": 10})
    _open(sqlite_uri).log_params({"steps": 20, "extra": 1})
    params = MlflowClient(sqlite_uri).get_run(run.run_id).data.params
    assert params == {"s3.endpoint": "http://x/***", "steps": "10", "extra": "1"}
    assert SECRET not in json.dumps(params)
