"""What a job can check before it starts Ray or loads a model: that its input exists, that its output can be
written, that its models can be found (offline too). Each check raises `PrecheckFailed` with one line,
"<what is wrong>; <what to pass instead>", which `pipelines.cli.job_main` prints and exits with 2.

The checks are quick and load nothing big: a directory listing, an S3 HEAD with a short timeout and one
attempt, a model's config.json looked up in the Hugging Face cache or with one HEAD request to the hub.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow.fs as pafs

from pipelines.config import S3Options
from pipelines.storage import local_abspath, s3_filesystem

S3_TIMEOUT_S = 10.0
HUB_TIMEOUT_S = 10.0
# S3's rules for a bucket name: 3-63 lowercase letters, digits, dots and hyphens, a letter or digit at each end
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
MODEL_CONFIG = "config.json"  # what diffusers and transformers read first from a model folder or repo


class PrecheckFailed(ValueError):
    """A job cannot start: the message says what is wrong and what to pass instead."""


def check_input(uri: str, s3: S3Options = S3Options()) -> None:
    """The input exists: a local file or folder, or an s3:// bucket with something under the prefix."""
    if uri.startswith("s3://"):
        bucket, prefix = _s3_parts(uri, flag="--input")
        fs = _s3(s3, bucket, uri, flag="--input")
        if prefix and _info(fs, f"{bucket}/{prefix}", uri, s3).type == pafs.FileType.NotFound:
            raise PrecheckFailed(f"input {uri} does not exist: nothing under {prefix!r} in bucket {bucket!r}; "
                                 "pass --input the s3:// prefix your images are under")
        return
    path = _local(uri)
    if not os.path.exists(path):
        raise PrecheckFailed(f"input {path} does not exist; pass --input a folder of images or img2dataset "
                             "output, as a local path or s3://BUCKET/PREFIX")


def check_output(uri: str, s3: S3Options = S3Options()) -> None:
    """The output can be written: an existing s3:// bucket, or a local folder (existing or not) under a
    writable one."""
    if uri.startswith("s3://"):
        bucket, _ = _s3_parts(uri, flag="--output")
        _s3(s3, bucket, uri, flag="--output")
        return
    path = Path(_local(uri))
    if path.exists() and not path.is_dir():
        raise PrecheckFailed(f"output {path} is a file; pass --output a folder (new or existing)")
    parent = next(p for p in (path, *path.parents) if p.exists())
    if not parent.is_dir():
        raise PrecheckFailed(f"output {path}: {parent} is a file; pass --output a path under a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PrecheckFailed(f"output {path}: {parent} is not writable by this user; pass --output a folder you "
                             "can write to")


def check_model(name_or_path: str, *, what: str) -> None:
    """`name_or_path` can be loaded here: a local model folder (with a config.json), or a hub id whose
    config.json is in the local Hugging Face cache or, online, found by one HEAD request (no retries).
    `what` is the job's flag for it ("--vae"): the messages say what to pass instead. s3:// models are
    checked where they are copied, not here."""
    if name_or_path.startswith("s3://"):
        return
    path = _local(name_or_path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, MODEL_CONFIG)):
            raise PrecheckFailed(f"{what} {path} is a folder without {MODEL_CONFIG}, not a saved model; pass "
                                 f"{what} a folder written by save_pretrained, or a Hugging Face hub id")
        return
    if os.path.exists(path):
        raise PrecheckFailed(f"{what} {path} is a file; pass {what} a model folder or a Hugging Face hub id")
    if not _is_repo_id(name_or_path):
        raise PrecheckFailed(f"{what} {path} does not exist; pass {what} a model folder or a Hugging Face hub id")
    _check_hub(name_or_path, what=what)


def _check_hub(repo_id: str, *, what: str) -> None:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo_id, MODEL_CONFIG), str):
        return
    if _hub_offline():
        raise PrecheckFailed(f"{what} {repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                             f"pass {what} /path/to/a/local/copy, or unset HF_HUB_OFFLINE to download it")
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, MODEL_CONFIG), timeout=HUB_TIMEOUT_S, retry_on_errors=False)
    except GatedRepoError:
        raise PrecheckFailed(f"{what} {repo_id} is gated: this machine's HF_TOKEN has no access; accept its terms "
                             f"on the hub, or pass {what} /path/to/a/local/copy") from None
    except RepositoryNotFoundError:
        raise PrecheckFailed(f"{what} {repo_id}: no such model on the Hugging Face hub (or private); pass {what} "
                             "an existing hub id or a local model folder") from None
    except Exception as e:  # noqa: BLE001 - unreachable, timed out, a proxy's answer: one line says which
        raise PrecheckFailed(f"{what} {repo_id} is not cached and the Hugging Face hub did not answer "
                             f"({type(e).__name__}: {str(e)[:200]}); pass {what} /path/to/a/local/copy") from None


def _hub_offline() -> bool:
    # read at call time, as huggingface_hub's own flag is read once at its import
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _local(uri: str) -> str:
    return local_abspath(uri.removeprefix("file://"))


def _s3_parts(uri: str, *, flag: str) -> tuple[str, str]:
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise PrecheckFailed(f"{flag} {uri!r} names no bucket; pass {flag} s3://BUCKET/PREFIX")
    if not BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
        raise PrecheckFailed(f"{flag} {uri!r}: {bucket!r} is not a valid S3 bucket name (3-63 lowercase letters, "
                             f"digits, dots, hyphens); pass {flag} s3://BUCKET/PREFIX")
    return bucket, prefix.strip("/")


def _s3(s3: S3Options, bucket: str, uri: str, *, flag: str) -> pafs.FileSystem:
    """An S3 filesystem that fails fast, after checking that `bucket` exists."""
    fs = s3_filesystem(s3, timeout_s=S3_TIMEOUT_S)
    if _info(fs, bucket, uri, s3).type == pafs.FileType.NotFound:
        raise PrecheckFailed(f"{flag} {uri}: bucket {bucket!r} does not exist at {s3.endpoint_url or 'AWS S3'}; "
                             f"create it, or pass {flag} s3://AN-EXISTING-BUCKET/PREFIX")
    return fs


def _info(fs: pafs.FileSystem, path: str, uri: str, s3: S3Options) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as e:
        where = s3.endpoint_url or "AWS S3"
        raise PrecheckFailed(f"{uri}: {where} did not answer ({str(e).splitlines()[0][:200]}); pass --s3-endpoint "
                             "the S3 server's URL, and check the AWS credentials of this machine") from None
