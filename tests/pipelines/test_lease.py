"""The output lease (pipelines/lease.py): real processes race for it, a holder is SIGKILLed, moto S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest

from pipelines.lease import LEASE, Lease, LeaseHeld, default_holder

FS = pafs.LocalFileSystem()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# One contender: at each start time, try the lease of one folder and keep whatever it won until the end.
RACER = """
import json, sys, time
import pyarrow.fs as pafs
from pipelines.lease import Lease, LeaseHeld
name, start, roots = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
held, results = [], []
for i, root in enumerate(roots):
    time.sleep(max(0.0, start + 0.5 * i - time.time()))
    try:
        held.append(Lease.acquire(pafs.LocalFileSystem(), root, holder=name, ttl_s=30))
        results.append(True)
    except LeaseHeld:
        results.append(False)
print(json.dumps(results), flush=True)
time.sleep(1.0)  # the loser of the last round must still find it held
for lease in held:
    lease.release()
"""

# A holder that stays until it is killed: prints the lease it holds, then sleeps.
HOLDER = """
import sys, time
import pyarrow.fs as pafs
from pipelines.config import S3Options
from pipelines.storage import resolve
fs, root = resolve(sys.argv[1], S3Options(endpoint_url=sys.argv[2] or None))
from pipelines.lease import Lease
lease = Lease.acquire(fs, root, holder="doomed holder", ttl_s=float(sys.argv[3]))
print("acquired", flush=True)
time.sleep(600)
"""


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT}, **kwargs)


def test_two_processes_racing_exactly_one_wins_each_round(tmp_path):
    roots = [str(tmp_path / f"out{i}") for i in range(6)]
    start = time.time() + 3.0  # both interpreters are up by then
    racers = [_python(RACER, name, str(start), *roots) for name in ("a", "b")]
    results = [json.loads(p.communicate(timeout=60)[0].splitlines()[-1]) for p in racers]
    assert all(p.returncode == 0 for p in racers)
    assert [int(a) + int(b) for a, b in zip(*results)] == [1] * len(roots)  # exactly one winner every round
    assert not any((tmp_path / f"out{i}" / LEASE).exists() for i in range(6))  # released at the end


def _hold_then_kill(uri: str, endpoint: str, fs, root: str, ttl: float) -> None:
    """A holder in another process renews past its ttl; SIGKILLed, its lease is taken over once it expires."""
    holder = _python(HOLDER, uri, endpoint, str(ttl))
    try:
        assert holder.stdout.readline().strip() == "acquired"
        time.sleep(1.5 * ttl)  # past the first expiry: still held because the heartbeat renewed it
        with pytest.raises(LeaseHeld, match="doomed holder.*expires"):
            Lease.acquire(fs, root, holder="second", ttl_s=ttl)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    killed = time.time()
    with fs.open_input_stream(f"{root}/{LEASE}") as f:
        expires_at = json.loads(f.read())["expires_at"]  # the dead holder's last renewal
    while True:
        try:
            lease = Lease.acquire(fs, root, holder="second", ttl_s=ttl)
            break
        except LeaseHeld:
            assert time.time() - killed < ttl + 5, "a dead holder's lease never expired"
            time.sleep(0.1)
    assert time.time() >= expires_at and lease.record["holder"] == "second"  # not before it expired
    with pytest.raises(LeaseHeld, match="second"):
        Lease.acquire(fs, root, holder="third", ttl_s=ttl)
    lease.release()
    Lease.acquire(fs, root, holder="third", ttl_s=ttl).release()  # free again after release


def test_killed_holder_is_taken_over_after_ttl(tmp_path):
    _hold_then_kill(str(tmp_path / "out"), "", FS, str(tmp_path / "out"), ttl=2.0)


def test_lease_is_released_on_error_and_names_this_process(tmp_path):
    root = str(tmp_path / "out")
    with pytest.raises(ZeroDivisionError):
        with Lease.acquire(FS, root, holder=default_holder(), ttl_s=5):
            stored = json.loads((tmp_path / "out" / LEASE).read_text())
            assert f"pid {os.getpid()}" in stored["holder"] and stored["expires_at"] > time.time()
            1 / 0
    assert not (tmp_path / "out" / LEASE).exists()


def test_default_holder_is_the_ray_submission_id(monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "raysubmit_x"}}))
    assert default_holder().startswith("ray job raysubmit_x (")


@pytest.mark.integration
@pytest.mark.chaos
def test_s3_lease_conditional_put_and_takeover(s3_server):
    import boto3

    from pipelines.config import S3Options
    from pipelines.storage import resolve

    endpoint = s3_server["HDM_S3_ENDPOINT"]
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="hdm-lease")
    fs, root = resolve("s3://hdm-lease/out", S3Options(endpoint_url=endpoint))
    with Lease.acquire(fs, root, holder="first", ttl_s=30):
        with pytest.raises(LeaseHeld, match="s3://hdm-lease/out/_lease.json is being written by first"):
            Lease.acquire(fs, root, holder="second", ttl_s=30)
    _hold_then_kill("s3://hdm-lease/out", endpoint, fs, root, ttl=2.0)
