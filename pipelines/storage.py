"""Local paths and s3:// URIs behind one pyarrow filesystem interface (picklable, so Ray tasks take it)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from pipelines.config import S3Options


# Set by Ray's job supervisor in a submitted job's driver: its runtime env, with the uploaded working_dir
RAY_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class RelativePathInJob(ValueError):
    """A relative local path in a Ray job that runs in Ray's copy of the submitter's working directory."""

    def __init__(self, path: str):
        super().__init__(
            f"{path}: a relative path in a Ray job resolves inside Ray's copy of the working directory "
            f"({os.getcwd()}), not in the folder the job was submitted from; give an absolute path "
            f'(e.g. "$PWD/{path}") or an s3:// URI')


def in_uploaded_working_dir() -> bool:
    """Whether this process is a Ray job's driver running in an uploaded `--working-dir` copy."""
    try:
        runtime_env = json.loads(os.environ.get(RAY_JOB_CONFIG, "{}")).get("runtime_env") or {}
    except ValueError:
        return False
    return bool(runtime_env.get("working_dir"))


def local_abspath(path: str) -> str:
    """The absolute form of a local path. A relative one that does not exist here, in a job that runs in an
    uploaded working dir, is refused (RelativePathInJob): it was meant where the user typed it, and anything
    written there would vanish with Ray's copy. One that exists in the copy (shipped with the code) is kept."""
    path = os.path.expanduser(path)
    if not os.path.isabs(path) and not os.path.exists(path) and in_uploaded_working_dir():
        raise RelativePathInJob(path)
    return os.path.abspath(path)


def resolve(uri: str, s3: S3Options = S3Options()) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, a file:// URI or an s3://bucket/prefix URI."""
    if uri.startswith("s3://"):
        return s3_filesystem(s3), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), local_abspath(uri.removeprefix("file://"))


def s3_filesystem(options: S3Options, *, timeout_s: float | None = None) -> pafs.S3FileSystem:
    """`timeout_s`: connect and request timeouts and a single attempt, for a quick check that fails fast
    (the default retries a slow or absent endpoint for minutes)."""
    kwargs: dict = {}
    if timeout_s is not None:
        kwargs.update(connect_timeout=timeout_s, request_timeout=timeout_s,
                      retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
    if options.endpoint_url:
        scheme, _, host = options.endpoint_url.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    if options.profile:
        import boto3

        creds = boto3.Session(profile_name=options.profile).get_credentials()
        if creds is None:
            raise ValueError(f"AWS profile {options.profile!r} has no credentials")
        creds = creds.get_frozen_credentials()
        kwargs.update(access_key=creds.access_key, secret_key=creds.secret_key, session_token=creds.token)
    region = options.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def join(*parts: str) -> str:
    return str(PurePosixPath(*parts))


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(fs: pafs.FileSystem, path: str, *, skip: tuple[str, ...] = (".", "_")) -> list[str]:
    """Every file under `path`, recursively, sorted, less those with a name (of the file or of a folder on
    the way) that starts with one of `skip`: by default hidden files (".") and our own temporary and
    bookkeeping files ("_", e.g. OUTPUT/_attempts/). Inputs are listed with skip=() (a camera's
    `_DSC1234.JPG` is an image)."""
    if not exists(fs, path):
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File
                  and not any(part.startswith(skip) for part in PurePosixPath(i.path[len(path):]).parts))


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write to a hidden temporary name, then move into place: readers never see a partial file."""
    parent = str(PurePosixPath(path).parent)
    fs.create_dir(parent, recursive=True)
    tmp = join(parent, f".tmp-{uuid.uuid4().hex}")
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


# --- between local paths and s3:// -----------------------------------------------------------------------

def download(uri: str, scratch: Path, s3: S3Options = S3Options(), *, files: tuple[str, ...] | None = None,
             optional: tuple[str, ...] = ()) -> str:
    """A local path for `uri`: `uri` itself when it is not s3:// (a local path, file:// stripped, or a hub
    id); else a copy under `scratch` of the object, of the whole prefix, or of just `files` (and those of
    `optional` that exist) under the prefix. A missing object or file is refused before anything is copied."""
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if not uri.startswith("s3://"):
        return uri
    fs, path = resolve(uri, s3)
    if not exists(fs, path):
        raise FileNotFoundError(f"nothing at {uri}")
    dest = Path(scratch) / f"{sum(1 for _ in Path(scratch).iterdir())}-{PurePosixPath(path).name}"
    local = pafs.LocalFileSystem()
    if files is None:
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            dest.mkdir(parents=True)  # copy_files makes only the folders of nested files, not the top one
        pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=local)
        return str(dest)
    missing = [name for name in files if not exists(fs, join(path, name))]
    if missing:
        raise FileNotFoundError(f"{uri} is not a checkpoint: no {missing[0]}")
    dest.mkdir(parents=True)
    for name in (*files, *(n for n in optional if exists(fs, join(path, n)))):
        pafs.copy_files(join(path, name), str(dest / name), source_filesystem=fs, destination_filesystem=local)
    return str(dest)


@contextmanager
def local_path(uri: str, s3: S3Options = S3Options()) -> Iterator[str]:
    """`download` into a temporary directory removed on exit (nothing is copied for a local path)."""
    with tempfile.TemporaryDirectory(prefix="hdm-download-") as scratch:
        yield download(uri, Path(scratch), s3)


def cache_dir(what: str) -> Path:
    """This node's cache of `what` ("models", "fid"): $XDG_CACHE_HOME/hdm/WHAT, else ~/.cache/hdm/WHAT."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hdm" / what


def node_copy(uri: str, s3: S3Options = S3Options()) -> str:
    """A local path for a model that loaders take by path or hub id (a VAE): `uri` itself when it is not s3://,
    else this node's cached copy of it, downloaded when there is none of the objects as they are now (names,
    sizes, modification times). Every process of a node (the precompute driver, each encoder, a train worker)
    shares one copy: each downloads into a folder of its own and renames it into place, so none sees half a
    copy, and a later run finds it. A copy of the objects as they were before is removed. FileNotFoundError
    when nothing is at `uri`."""
    if not uri.startswith("s3://"):
        return uri.removeprefix("file://")
    fs, path = resolve(uri, s3)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"nothing at {uri}")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True)) if info.type == pafs.FileType.Directory \
        else [info]
    listing = sorted((i.path, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
    home = cache_dir("models") / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:24]
    copy = home / hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
    name = PurePosixPath(path).name
    if not copy.is_dir():
        home.mkdir(parents=True, exist_ok=True)
        tmp = home / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            target = tmp if info.type == pafs.FileType.Directory else tmp / name
            pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            tmp.rename(copy)
        except OSError:
            if not copy.is_dir():  # not another process's rename that came first: a failed download
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in home.iterdir():
            if old != copy and not old.name.startswith(".tmp-"):
                shutil.rmtree(old, ignore_errors=True)
    return str(copy if info.type == pafs.FileType.Directory else copy / name)


def upload(local_dir: str | os.PathLike, uri: str, s3: S3Options = S3Options()) -> None:
    """Copy the files of `local_dir` under `uri` (a local path or s3://), creating it."""
    fs, path = resolve(uri, s3)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(os.fspath(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
