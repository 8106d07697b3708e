"""Ray token auth as the node and KubeRay run it: a real local head started with a token refuses the job API
to a client without that token (the `ray job submit` CLI and the Python JobSubmissionClient alike) and runs
the job of a client that has it. Every client runs in its own process with HOME an empty folder, so a token
file (~/.ray/auth_token, which any local `ray.init()` leaves behind) cannot stand in for the one under test."""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import services

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MARK = "hdm-auth-job-ran"
JOB = ["python", "-c", f"import pipelines; print({MARK!r})"]  # the working dir arrived and the job ran
# The Python SDK, as the DAG runner uses it: submit (address, entrypoint, working dir), wait, print the status
# and the logs.
SDK_CLIENT = """
import sys, time
from ray.job_submission import JobSubmissionClient
client = JobSubmissionClient(sys.argv[1])
job = client.submit_job(entrypoint=sys.argv[2], runtime_env={"working_dir": sys.argv[3]})
while not client.get_job_status(job).is_terminal():
    time.sleep(0.5)
print(client.get_job_status(job).value)
print(client.get_job_logs(job))
"""


@pytest.fixture(scope="module")
def auth_head():
    """A Ray head of its own with token auth on, and its token."""
    token = secrets.token_hex(16)
    head = services.start_ray_head(num_cpus=1, auth_token=token)
    try:
        yield head.env["HDM_RAY_DASHBOARD"], token
    finally:
        services.stop(head)


# Auth settings, and the address of another cluster (CI's own head, exported by .ci/run): a client that
# carries RAY_ADDRESS sends its job there whatever --address says, so it would not be refused by this head.
CLIENT_UNSET = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "HDM_RAY_DASHBOARD")


def client_env(home: Path, **auth: str) -> dict[str, str]:
    """This environment without any Ray auth setting, HOME an empty folder, then `auth` on top."""
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_UNSET}
    return {**env, "HOME": str(home), "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", **auth}


def ray_job_submit(dashboard: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> -- python ...`, the CLI as tests/pipelines/helpers.py runs it."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--working-dir", str(ROOT), "--", *JOB]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def sdk_submit(dashboard: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SDK_CLIENT, dashboard, shlex.join(JOB), str(ROOT)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def submitted_jobs(dashboard: str, token: str, home: Path) -> list[str]:
    """Entrypoints of every job the head has, read by an authorized client."""
    code = ("import sys; from ray.job_submission import JobSubmissionClient; "
            "print('\\n'.join(j.entrypoint for j in JobSubmissionClient(sys.argv[1]).list_jobs()))")
    listed = subprocess.run([sys.executable, "-c", code, dashboard], capture_output=True, text=True, timeout=120,
                            env=client_env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token))
    assert listed.returncode == 0, listed.stderr[-2000:]
    return [line for line in listed.stdout.splitlines() if MARK in line]


def test_job_api_refuses_clients_without_the_token_and_runs_the_jobs_of_those_with_it(auth_head, tmp_path):
    dashboard, token = auth_head
    home = tmp_path / "home"
    home.mkdir()

    refused = {
        "cli, no token": ray_job_submit(dashboard, client_env(home)),
        "sdk, no token": sdk_submit(dashboard, client_env(home)),
        "cli, wrong token": ray_job_submit(dashboard, client_env(home, RAY_AUTH_MODE="token",
                                                                 RAY_AUTH_TOKEN=secrets.token_hex(16))),
        "sdk, wrong token": sdk_submit(dashboard, client_env(home, RAY_AUTH_MODE="token",
                                                             RAY_AUTH_TOKEN=secrets.token_hex(16))),
    }
    for case, result in refused.items():
        output = result.stdout + result.stderr
        assert result.returncode != 0, case
        expected = "Missing authentication token" if "no token" in case else "Invalid authentication token"
        assert "AuthenticationError: Authentication " in output and expected in output, (case, output[-2000:])
        assert MARK not in result.stdout, case
    assert not list(home.iterdir())  # no token file appeared that a later client could pick up
    assert submitted_jobs(dashboard, token, home) == []  # refused before any job was created

    authorized = client_env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    cli = ray_job_submit(dashboard, authorized)
    assert cli.returncode == 0 and "succeeded" in cli.stdout and MARK in cli.stdout, cli.stderr[-2000:]
    sdk = sdk_submit(dashboard, authorized)
    assert sdk.returncode == 0, sdk.stderr[-2000:]
    assert sdk.stdout.splitlines()[0] == "SUCCEEDED" and MARK in sdk.stdout, sdk.stdout[-2000:]
    assert len(submitted_jobs(dashboard, token, home)) == 2
