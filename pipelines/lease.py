"""One writer per output: a lease file that a second job on the same output refuses (pipelines/data/precompute.py).

OUTPUT/_lease.json holds the holder (Ray job submission id, else host and pid), a random token and the
acquired and expiry times. It is created exclusively: on a local filesystem by a hard link of a complete
temporary file (atomic, fails when the name exists); on s3:// by a conditional put (If-None-Match: *).
A heartbeat thread renews it every ttl_s / 3 while its token is still the one stored (on S3 If-Match on the
ETag); a lease not renewed past its expiry (its holder died) is taken over. The "_" name keeps it out of
listings and readers (storage.list_files).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipelines.storage import join

LEASE = "_lease.json"


class LeaseHeld(RuntimeError):
    """Another live job holds the output's lease; the message names it and when the lease expires."""


def default_holder() -> str:
    """Who is writing: the Ray job submission id when this process is a submitted job's driver, else host and pid."""
    submission = os.environ.get("RAY_JOB_SUBMISSION_ID")
    if not submission and os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        metadata = json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"]).get("metadata", {})
        submission = metadata.get("job_submission_id")
    where = f"{socket.gethostname()} pid {os.getpid()}"
    return f"ray job {submission} ({where})" if submission else where


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class Lease:
    """An output's lease, held until `release()` (or the end of a `with` block, errors included)."""

    def __init__(self, store: Any, record: dict[str, Any], version: Any, ttl_s: float):
        self.store, self.record, self.version, self.ttl_s = store, record, version, ttl_s
        self.lost = False  # set when a renewal found another holder (ours expired without renewal)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, fs: pafs.FileSystem, root: str, *, holder: str, ttl_s: float = 60.0) -> Lease:
        """The lease of the output at `root`, or LeaseHeld naming who holds it and until when."""
        store = _S3Store(fs, join(root, LEASE)) if isinstance(fs, pafs.S3FileSystem) else _LocalStore(join(root, LEASE))
        now = time.time()
        record = {"holder": holder, "token": uuid.uuid4().hex, "acquired": _when(now), "expires_at": now + ttl_s,
                  "expires": _when(now + ttl_s)}
        for _ in range(3):  # a lease released between our create and our read: try again
            version = store.create(record)
            if version is not None:
                return cls(store, record, version, ttl_s)
            current = store.read()
            if current is None:
                continue
            stored, stored_version = current
            if stored["expires_at"] > time.time():
                raise LeaseHeld(f"{store.uri} is being written by {stored['holder']} (lease acquired "
                                f"{stored['acquired']}, expires {stored['expires']} unless renewed); wait for "
                                "that job to end or write to another output")
            version = store.replace(stored_version, record)  # its holder stopped renewing: take it over
            if version is not None and _still_ours(store, record):
                print(f"lease: took over {store.uri} from {stored['holder']} (expired {stored['expires']})",
                      file=sys.stderr, flush=True)
                return cls(store, record, version, ttl_s)
        raise LeaseHeld(f"{store.uri}: another job took the lease at the same moment; try again")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            now = time.time()
            record = {**self.record, "expires_at": now + self.ttl_s, "expires": _when(now + self.ttl_s)}
            try:
                version = self.store.replace(self.version, record)
            except Exception as e:  # noqa: BLE001 - a storage hiccup: the next beat tries again before expiry
                print(f"lease: renewal of {self.store.uri} failed ({type(e).__name__}: {e})", file=sys.stderr)
                continue
            if version is None:
                self.lost = True
                print(f"lease: {self.store.uri} was taken over by another job", file=sys.stderr, flush=True)
                return
            self.record, self.version = record, version

    def check(self) -> None:
        """Raise LeaseHeld when the lease was lost (not renewed in time and taken over): stop writing."""
        if self.lost:
            raise LeaseHeld(f"{self.store.uri}: this job's lease was taken over by another job")

    def release(self) -> None:
        """Stop renewing and remove the lease file when it is still ours."""
        self._stop.set()
        self._thread.join()
        if not self.lost:
            self.store.delete(self.version)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _still_ours(store: Any, record: dict[str, Any]) -> bool:
    """After a takeover, whether the stored lease is ours (two jobs taking over the same expired lease at
    once: one of them reads the other's token and gives way)."""
    time.sleep(0.2)
    current = store.read()
    return current is not None and current[0]["token"] == record["token"]


class _LocalStore:
    """The lease file on a local filesystem; its version is the stored token."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.uri = str(self.path)

    def _temporary(self, record: dict[str, Any]) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.parent / f".tmp-lease-{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(record))
        return tmp

    def create(self, record: dict[str, Any]) -> str | None:
        tmp = self._temporary(record)
        try:
            os.link(tmp, self.path)  # atomic, and fails when the name exists: an exclusive create of a whole file
            return record["token"]
        except FileExistsError:
            return None
        finally:
            tmp.unlink()

    def read(self) -> tuple[dict[str, Any], str] | None:
        try:
            record = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        return record, record["token"]

    def replace(self, version: str, record: dict[str, Any]) -> str | None:
        current = self.read()
        if current is None or current[1] != version:
            return None
        os.replace(self._temporary(record), self.path)
        return record["token"]

    def delete(self, version: str) -> None:
        current = self.read()
        if current is not None and current[1] == version:
            self.path.unlink(missing_ok=True)


class _S3Store:
    """The lease object on S3, written with conditional puts; its version is the object's ETag."""

    def __init__(self, fs: pafs.S3FileSystem, path: str):
        self.bucket, _, self.key = path.partition("/")
        self.uri = f"s3://{path}"
        self.client = _boto3_client(fs)

    def _put(self, record: dict[str, Any], **condition: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=json.dumps(record).encode(),
                                          **condition)["ETag"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None
            raise

    def create(self, record: dict[str, Any]) -> str | None:
        return self._put(record, IfNoneMatch="*")

    def read(self) -> tuple[dict[str, Any], str] | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        return json.loads(obj["Body"].read()), obj["ETag"]

    def replace(self, version: str, record: dict[str, Any]) -> str | None:
        return self._put(record, IfMatch=version)

    def delete(self, version: str) -> None:
        current = self.read()
        if current is not None and current[1] == version:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)


def _boto3_client(fs: pafs.S3FileSystem):
    """A boto3 S3 client for the endpoint, region and credentials of a pyarrow S3 filesystem (pyarrow has no
    conditional put); credentials not set on `fs` come from the environment, as pyarrow's do."""
    import boto3

    options = fs.__reduce__()[1][0]  # the keyword arguments `fs` was made with
    kwargs: dict[str, Any] = {}
    if options.get("endpoint_override"):
        endpoint = options["endpoint_override"]
        kwargs["endpoint_url"] = endpoint if "://" in endpoint else f"{options.get('scheme') or 'https'}://{endpoint}"
    if options.get("region"):
        kwargs["region_name"] = options["region"]
    if options.get("access_key"):
        kwargs.update(aws_access_key_id=options["access_key"], aws_secret_access_key=options["secret_key"],
                      aws_session_token=options.get("session_token") or None)
    return boto3.client("s3", **kwargs)
