"""The DAG runner's Ray jobs: deterministic submission ids, attaching to a stage job that still runs, the
job's environment (no credentials), and its log streamed line by line through redaction.

A stage's jobs are `hdm-<pipeline>-<stage>-<digest[:12]>-<attempt>` (attempt 1, 2, ...): a rerun finds the
job a stopped runner left behind by its id prefix and attaches to it while it is PENDING or RUNNING, so one
output folder never has two writers; otherwise it submits the next attempt.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pipelines.dag.spec import KINDS, DagConfig, StagePlan
from pipelines.secrets import environment_secrets, redact_text

API_SERVER_ADDRESS = "RAY_API_SERVER_ADDRESS"  # read by Ray's job client before its address argument

ROOT = Path(__file__).resolve().parents[2]  # the working directory every job runs in (uploaded by Ray)
UPLOAD_EXCLUDES = [".git", ".venv", "runs", "mlruns", "*.safetensors", "__pycache__", ".pytest_cache"]
ACTIVE = ("PENDING", "RUNNING")


class StageJobRunning(RuntimeError):
    """A stage job is still PENDING/RUNNING where the runner would change its output (`--from`)."""


def submission_client(address: str):
    """A JobSubmissionClient of the dashboard at `address` and no other. Ray's client (and `ray job submit`)
    takes $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, over the address it is given
    (ray.dashboard.utils.get_address_for_submission_client): a shell still pointing at another cluster
    would get every stage, silently. The address is resolved once, when the client is made."""
    from ray.job_submission import JobSubmissionClient

    saved = os.environ.get(API_SERVER_ADDRESS)
    os.environ[API_SERVER_ADDRESS] = address
    try:
        return JobSubmissionClient(address)
    finally:
        if saved is None:
            del os.environ[API_SERVER_ADDRESS]
        else:
            os.environ[API_SERVER_ADDRESS] = saved


def job_prefix(pipeline: str, stage: StagePlan) -> str:
    """The submission id of the stage's jobs without the attempt number."""
    return f"hdm-{pipeline}-{stage.name}-{stage.digest[:12]}-"


@dataclass(frozen=True)
class StageJob:
    submission_id: str
    attempt: int
    status: str


def stage_jobs(client, pipeline: str, stage: StagePlan) -> list[StageJob]:
    """The Ray jobs of this stage and digest the cluster knows, by attempt."""
    prefix = job_prefix(pipeline, stage)
    found = []
    for job in client.list_jobs():
        sid = job.submission_id or ""
        if sid.startswith(prefix) and sid[len(prefix):].isdigit():
            found.append(StageJob(sid, int(sid[len(prefix):]), str(job.status.value)))
    return sorted(found, key=lambda j: j.attempt)


def active_job(client, pipeline: str, stage: StagePlan) -> StageJob | None:
    """The stage's latest job when it is PENDING or RUNNING."""
    jobs = stage_jobs(client, pipeline, stage)
    return jobs[-1] if jobs and jobs[-1].status in ACTIVE else None


def refuse_if_running(client, pipeline: str, stages: list[StagePlan], *, what: str) -> None:
    """Raise StageJobRunning naming the first stage job of `stages` that is PENDING/RUNNING."""
    for stage in stages:
        job = active_job(client, pipeline, stage)
        if job is not None:
            raise StageJobRunning(f"{what}: Ray job {job.submission_id} of stage {stage.name} is {job.status} and "
                                  f"writes into {stage.folder}; wait for it, or stop it with `ray job stop "
                                  f"{job.submission_id}`, then run again")


def job_env(config: DagConfig) -> dict[str, str]:
    """The job's env_vars: the runner's values of `forward_env` (no credential: spec.py refuses secret names)."""
    env = {k: os.environ[k] for k in config.pipeline.forward_env if k in os.environ}
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    return env


def submit(client, config: DagConfig, stage: StagePlan, data: dict, *, attempt: int) -> str:
    """Submit the stage's job as attempt `attempt`; its submission id."""
    entrypoint = f"python {KINDS[stage.kind].job} --config {shlex.quote(json.dumps(data))}"
    return client.submit_job(
        entrypoint=entrypoint, submission_id=f"{job_prefix(config.pipeline.name, stage)}{attempt}",
        runtime_env={"working_dir": str(ROOT), "excludes": UPLOAD_EXCLUDES, "env_vars": job_env(config)},
        metadata={"hdm.pipeline": config.pipeline.name, "hdm.stage": stage.name, "hdm.digest": stage.digest})


def tail(client, job_id: str, sink: TextIO, say: Callable[[str], None]) -> None:
    """Stream the job's log (from its start) to `sink` and `say`, a whole line at a time through
    `redact_text`, so that a credential split between two chunks is still masked."""
    secrets = environment_secrets()

    def emit(line: str) -> None:
        line = redact_text(line, secrets)
        sink.write(line + "\n")
        sink.flush()
        say(line)

    async def follow() -> None:
        pending = ""
        async for chunk in client.tail_job_logs(job_id):
            *lines, pending = (pending + chunk).split("\n")
            for line in lines:
                emit(line)
        if pending:
            emit(pending)

    asyncio.run(follow())
