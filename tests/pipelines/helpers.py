"""Running jobs the way users do, and reading their output back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def ray_job_submit(cluster: dict, entrypoint: list[str], *, env_vars: dict | None = None,
                   timeout: float = 600) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> -- python ...`: the real CLI against the test cluster."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster["HDM_RAY_DASHBOARD"], "--working-dir", str(ROOT)]
    if env_vars:
        cmd += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(cmd + ["--", "python", *entrypoint], capture_output=True, text=True, timeout=timeout,
                            env=env, cwd=ROOT)
    result.output = result.stdout + result.stderr  # type: ignore[attr-defined]
    return result


def read_parts(fs: pafs.FileSystem, path: str) -> list[dict]:
    """Every row of the Parquet files under `path` (hidden files skipped), as dicts."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except FileNotFoundError:
        return []
    rows = []
    for info in sorted(infos, key=lambda i: i.path):
        if info.path.endswith(".parquet") and not Path(info.path).name.startswith("."):
            rows.extend(pq.read_table(info.path, filesystem=fs).to_pylist())
    return rows
