"""Session services for integration tests: reuse the ones `.ci/run` started (their addresses are in the
environment), else start our own through infra/local/services.py and stop them by PID at the end."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "infra" / "local"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import services  # noqa: E402  (infra/local/services.py)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: their matmuls gain nothing from threads, and OpenMP
    threads stall for milliseconds on a busy CPU. Use with pytestmark = pytest.mark.usefixtures("one_thread")."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def _reuse_or_start(env_keys: tuple[str, ...], start):
    if all(os.environ.get(k) for k in env_keys):
        yield {k: os.environ[k] for k in env_keys}
        return
    service = start()
    try:
        yield service.env
    finally:
        services.stop(service)


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A Ray head node with a dashboard (for `ray job submit`): RAY_ADDRESS, HDM_RAY_DASHBOARD. Its node holds
    the S3 credentials in its own environment, as a real cluster's nodes do: jobs never carry them."""
    node_env = {k: v for k, v in s3_server.items() if k.startswith("AWS_")}
    with _reuse_or_start(("RAY_ADDRESS", "HDM_RAY_DASHBOARD"), lambda: services.start_ray_head(env=node_env)) as env:
        yield env


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1: HDM_S3_ENDPOINT and the AWS_* variables clients need (set here too)."""
    keys = ("HDM_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    with _reuse_or_start(keys, services.start_moto) as env:
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        yield env


@pytest.fixture(scope="session")
def mlflow_server():
    """An MLflow tracking server on 127.0.0.1: MLFLOW_TRACKING_URI."""
    with _reuse_or_start(("MLFLOW_TRACKING_URI",), services.start_mlflow) as env:
        yield env


@pytest.fixture(scope="module")
def ray_driver(ray_cluster):
    """This test process as a driver of the session's Ray cluster, for one test module."""
    import ray

    ray.init(address=ray_cluster["RAY_ADDRESS"], log_to_driver=False)
    yield
    ray.shutdown()
