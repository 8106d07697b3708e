"""Run a pipeline DAG (pipelines/dag/spec.py): each stage a Ray job, submitted through the job submission SDK,
its log streamed here and kept, its run recorded in MLflow under one parent run for the pipeline.

A stage is skipped when its MLflow run (found by stage name + config digest) finished and recorded its
outputs, and those outputs still exist (deleted ones make it run again); `from_stage` reruns a stage and
everything downstream of it from scratch (its old output folder is deleted first). A stage that did not
finish last time is resubmitted with the same output folder, so the jobs' own resume (precompute by key,
training from its last checkpoint) picks up where it stopped. A failed stage stops its dependents;
independent stages still run.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from pipelines.dag.spec import KINDS, DagConfig, StagePlan, experiment, job_config, plan, storage_root
from pipelines.storage import exists, resolve
from pipelines.tracking import (CHECKPOINT_TAG, DAG_DIGEST_TAG, DAG_DONE_TAG, DAG_ERROR_TAG, DAG_KIND_TAG,
                                DAG_OUTPUT_TAG, DAG_STAGE_TAG, StageRun)

ROOT = Path(__file__).resolve().parents[2]  # the working directory every job runs in (uploaded by Ray)
UPLOAD_EXCLUDES = [".git", ".venv", "runs", "mlruns", "*.safetensors", "__pycache__", ".pytest_cache"]


@dataclass
class StageResult:
    name: str
    status: str  # skipped, done, failed, blocked
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    log: str | None = None
    message: str = ""


def default_address() -> str:
    """The Ray dashboard to submit to: $RAY_ADDRESS as `ray job submit` reads it, else the local default."""
    return os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"


def log_dir_for(config: DagConfig) -> Path:
    """Where stage logs are kept: STORAGE/_logs for local storage, else ~/.hdm/logs/NAME."""
    root = storage_root(config)
    if root.startswith("s3://"):
        return Path.home() / ".hdm" / "logs" / config.pipeline.name
    return Path(root) / "_logs"


class DagRunner:
    def __init__(self, config: DagConfig, *, address: str | None = None, out: TextIO = sys.stdout,
                 poll_s: float = 1.0):
        from ray.job_submission import JobSubmissionClient

        self.config = config
        self.client = JobSubmissionClient(address or default_address())
        self.out = out
        self.poll_s = poll_s
        self.tracking_uri = config.pipeline.tracking.resolved_uri()
        self.experiment = experiment(config)
        self.log_dir = log_dir_for(config)

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def run(self, from_stage: str | None = None) -> list[StageResult]:
        if from_stage is not None and from_stage not in self.config.stages:
            raise ValueError(f"--from {from_stage!r}: no such stage (stages: {', '.join(self.config.stages)})")
        forced = self.config.descendants(from_stage) if from_stage else set()
        stages = plan(self.config)
        parent = StageRun.open(tracking_uri=self.tracking_uri, experiment=self.experiment,
                               stage_key=f"pipeline:{self.config.pipeline.name}", run_name=self.config.pipeline.name,
                               tags={DAG_KIND_TAG: "pipeline"})
        parent.log_params(self.config.model_dump(mode="json"))
        self.say(f"pipeline {self.config.pipeline.name}: {len(stages)} stages; MLflow {self.tracking_uri} "
                 f"experiment {self.experiment!r} run {parent.run_id}; logs in {self.log_dir}")
        results: dict[str, StageResult] = {}
        for stage in stages:
            blocked = [n for n in stage.needs if results[n].status in ("failed", "blocked")]
            if blocked:
                results[stage.name] = StageResult(stage.name, "blocked", message=f"not run: {blocked[0]} did not finish")
                self.say(f"[{stage.name}] not run: it needs {blocked[0]}, which did not finish")
                continue
            results[stage.name] = self._stage(stage, results, parent.run_id, force=stage.name in forced)
        for result in results.values():
            if result.metrics:
                parent.log_metrics({f"{result.name}.{k}": v for k, v in result.metrics.items()}, step=0)
        ok = all(r.status in ("done", "skipped") for r in results.values())
        parent.finish("FINISHED" if ok else "FAILED")
        return list(results.values())

    def _stage(self, stage: StagePlan, results: dict[str, StageResult], parent_id: str | None, *,
               force: bool) -> StageResult:
        previous = StageRun.find(tracking_uri=self.tracking_uri, experiment=self.experiment, stage_key=stage.stage_key)
        state = previous.state()
        if not force and state.status == "FINISHED" and state.tags.get(DAG_DONE_TAG) == stage.digest:
            outputs = {k[len(DAG_OUTPUT_TAG):]: v for k, v in state.tags.items() if k.startswith(DAG_OUTPUT_TAG)}
            gone = [uri for uri in outputs.values() if not exists(*resolve(uri, self.config.pipeline.s3))]
            if not gone:
                self.say(f"[{stage.name}] skipped: finished before with the same config ({stage.digest[:12]})")
                return StageResult(stage.name, "skipped", outputs, _own_metrics(state.metrics))
            self.say(f"[{stage.name}] finished before with the same config, but its output {gone[0]} is gone: "
                     "running it again")
        fs, path = resolve(stage.folder, self.config.pipeline.s3)
        if force and exists(fs, path):
            self.say(f"[{stage.name}] --from: deleting the previous output {stage.folder}")
            fs.delete_dir(path)
        run = StageRun.open(tracking_uri=self.tracking_uri, experiment=self.experiment, stage_key=stage.stage_key,
                            run_name=stage.name, parent_run_id=parent_id,
                            tags={DAG_STAGE_TAG: stage.name, DAG_KIND_TAG: stage.kind, DAG_DIGEST_TAG: stage.digest})
        data = job_config(self.config, stage, {n: r.outputs for n, r in results.items()},
                          tracking_uri=self.tracking_uri, parent_run_id=parent_id)
        if not KINDS[stage.kind].tracked:
            run.log_params(data)
        log = self.log_dir / f"{stage.name}.log"
        status, message = self._submit(stage, data, log)
        run.log_artifact(log, "logs")
        if status != "SUCCEEDED":
            run.set_tags({DAG_ERROR_TAG: message})
            run.finish("FAILED")
            self.say(f"[{stage.name}] FAILED ({message}); log: {log}")
            return StageResult(stage.name, "failed", log=str(log), message=message)
        outputs = stage.outputs()
        state = run.state()
        if stage.kind == "train":
            outputs["checkpoint"] = state.tags[CHECKPOINT_TAG]
        run.set_tags({**{DAG_OUTPUT_TAG + k: v for k, v in outputs.items()}, DAG_DONE_TAG: stage.digest})
        run.finish("FINISHED")
        self.say(f"[{stage.name}] done: " + ", ".join(f"{k} {v}" for k, v in outputs.items()))
        return StageResult(stage.name, "done", outputs, _own_metrics(state.metrics), str(log))

    def _submit(self, stage: StagePlan, data: dict, log: Path) -> tuple[str, str]:
        """Submit the stage's job, stream its log to `log` and here; (final status, message)."""
        entrypoint = f"python {KINDS[stage.kind].job} --config {shlex.quote(json.dumps(data))}"
        env = {k: os.environ[k] for k in self.config.pipeline.forward_env if k in os.environ}
        env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        job_id = self.client.submit_job(
            entrypoint=entrypoint, submission_id=f"{self.config.pipeline.name}-{stage.name}-{int(time.time())}",
            runtime_env={"working_dir": str(ROOT), "excludes": UPLOAD_EXCLUDES, "env_vars": env},
            metadata={"hdm.pipeline": self.config.pipeline.name, "hdm.stage": stage.name})
        self.say(f"[{stage.name}] submitted {KINDS[stage.kind].job} as Ray job {job_id}")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            asyncio.run(self._tail(job_id, stage.name, f))
        info = self.client.get_job_info(job_id)
        return str(info.status), f"Ray job {job_id} {info.status}: {(info.message or '').strip()}"

    async def _tail(self, job_id: str, name: str, sink: TextIO) -> None:
        async for chunk in self.client.tail_job_logs(job_id):
            sink.write(chunk)
            sink.flush()
            for line in chunk.splitlines():
                self.say(f"[{name}] {line}")


def _own_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """What the final report shows of a stage run: evaluation scores and the last loss."""
    return {k: v for k, v in metrics.items() if k.startswith("adherence") or k in ("loss", "psnr")}


def format_results(results: list[StageResult]) -> str:
    lines = ["", "stage                status    outputs / metrics"]
    for r in results:
        detail = ", ".join(f"{k}={v:.3f}" for k, v in sorted(r.metrics.items()))
        where = r.outputs.get("checkpoint") or r.outputs.get("report") or next(iter(r.outputs.values()), "")
        lines.append(f"{r.name:20s} {r.status:9s} {where}{'  ' + detail if detail else ''}"
                     f"{'  ' + r.message if r.status in ('failed', 'blocked') else ''}")
    return "\n".join(lines)
