"""Run a pipeline DAG (pipelines/dag/spec.py): each stage a Ray job, submitted through the job submission SDK,
its log streamed here and kept, its run recorded in MLflow under one parent run for the pipeline.

A stage is skipped when its MLflow run (found by stage name + config digest) finished and recorded its
outputs, and those outputs still exist (deleted ones make it run again); `from_stage` reruns a stage and
everything downstream of it from scratch (its old output folder is deleted first, and refused while a job of
one of those stages still runs). A stage that did not finish last time is attached to when its job still
runs (pipelines/dag/jobs.py), else resubmitted with the same output folder, so the jobs' own resume
(precompute by key, training from its last checkpoint) picks up where it stopped. A failed stage, or a
finished one whose quality gate failed (pipelines/dag/gates.py), stops its dependents; independent stages
still run. At the end the pipeline run gets the stage comparison (pipelines/dag/compare.py). Interrupted
(Ctrl-C, SIGTERM), the runner marks the stage run and the pipeline run KILLED and leaves the stage job
running, saying how to stop it.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from pipelines.dag import gates, jobs
from pipelines.dag.compare import log_comparison
from pipelines.dag.spec import (KINDS, DagConfig, StagePlan, experiment, job_config, jobs_tracking_uri, plan,
                                storage_root)
from pipelines.eval.metrics import EVAL_METRICS
from pipelines.progress import StageConsole, duration
from pipelines.secrets import redact_text
from pipelines.storage import exists, resolve
from pipelines.tracking import (CHECKPOINT_TAG, DAG_DIGEST_TAG, DAG_DONE_TAG, DAG_ERROR_TAG, DAG_KIND_TAG,
                                DAG_OUTPUT_TAG, DAG_STAGE_TAG, GATE_TAG, StageRun, Terminated, TrackingUnavailable)


@dataclass
class StageResult:
    name: str
    status: str  # skipped, done, failed, gate_failed (done or skipped, its quality gate failed), blocked
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    log: str | None = None
    message: str = ""


def default_address() -> str:
    """The Ray dashboard to submit to: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, as `ray job submit` reads
    them, else the local default."""
    return (os.environ.get(jobs.API_SERVER_ADDRESS) or os.environ.get("RAY_ADDRESS")
            or "http://127.0.0.1:8265")


def log_dir_for(config: DagConfig) -> Path:
    """Where stage logs are kept: STORAGE/_logs for local storage, else ~/.hdm/logs/NAME."""
    root = storage_root(config)
    if root.startswith("s3://"):
        return Path.home() / ".hdm" / "logs" / config.pipeline.name
    return Path(root) / "_logs"


class DagRunner:
    def __init__(self, config: DagConfig, *, address: str | None = None, out: TextIO = sys.stdout,
                 verbose: bool = False):
        self.config = config
        self.tracking_uri = config.pipeline.tracking.resolved_uri()
        jobs_tracking_uri(config, self.tracking_uri)  # ValueError now, not at the first tracked stage
        self.address = address or default_address()
        self.client = jobs.submission_client(self.address)
        self.out = out
        self.verbose = verbose  # every line of the stage jobs' logs on the console, not just theirs
        self.experiment = experiment(config)
        self.log_dir = log_dir_for(config)
        self.job_id: str | None = None  # the stage job being followed now
        self._stage_run: StageRun | None = None  # its MLflow run
        self.parent_run_id: str | None = None  # the pipeline's run, once open

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def run(self, from_stage: str | None = None) -> list[StageResult]:
        """Every stage in order; raises jobs.StageJobRunning (nothing changed) when `from_stage` or a stage
        after it has a job still running, TrackingUnavailable when MLflow stops answering."""
        if from_stage is not None and from_stage not in self.config.stages:
            raise ValueError(f"--from {from_stage!r}: no such stage (stages: {', '.join(self.config.stages)})")
        forced = self.config.descendants(from_stage) if from_stage else set()
        stages = plan(self.config)
        jobs.refuse_if_running(self.client, self.config.pipeline.name, [s for s in stages if s.name in forced],
                               what=f"--from {from_stage}")
        parent = StageRun.open(tracking_uri=self.tracking_uri, experiment=self.experiment,
                               stage_key=f"pipeline:{self.config.pipeline.name}", run_name=self.config.pipeline.name,
                               tags={DAG_KIND_TAG: "pipeline"})
        self.parent_run_id = parent.run_id  # holds the stage comparison (jobs/run_pipeline.py links it)
        try:
            return self._run(stages, forced, parent)
        except (KeyboardInterrupt, Terminated):
            self._close(parent, "KILLED")
            raise
        except TrackingUnavailable:
            raise  # MLflow does not answer: nothing more to mark
        except Exception:
            self._close(parent, "FAILED")
            raise

    def _run(self, stages: list[StagePlan], forced: set[str], parent: StageRun) -> list[StageResult]:
        parent.log_params(self.config.model_dump(mode="json"))
        self.say(f"pipeline {self.config.pipeline.name}: {len(stages)} stages; MLflow {self.tracking_uri} "
                 f"experiment {self.experiment!r} run {parent.run_id}; logs in {self.log_dir}")
        results: dict[str, StageResult] = {}
        for stage in stages:
            blocked = [n for n in stage.needs if results[n].status in ("failed", "gate_failed", "blocked")]
            if blocked:
                up = results[blocked[0]]
                why = up.message if up.status == "gate_failed" else f"{up.name} did not finish"
                results[stage.name] = StageResult(stage.name, "blocked", message=f"not run: {why}")
                self.say(f"[{stage.name}] not run: it needs {up.name}" + (
                    f"; {why}" if up.status == "gate_failed" else ", which did not finish"))
                continue
            result = self._stage(stage, results, parent.run_id, force=stage.name in forced)
            results[stage.name] = self._gate(stage, result, results)
        for result in results.values():
            if result.metrics:
                parent.log_metrics({f"{result.name}.{k}": v for k, v in result.metrics.items()}, step=0)
        if log_comparison(parent, stages=stages, results=results, title=f"pipeline {self.config.pipeline.name}"):
            self.say(f"stage comparison: artifacts comparison/ (stages.csv, stages.html, metrics.png) of run "
                     f"{parent.run_id}")
        ok = all(r.status in ("done", "skipped") for r in results.values())
        parent.finish("FINISHED" if ok else "FAILED")
        return list(results.values())

    def _close(self, parent: StageRun, status: str) -> None:
        """Interrupted or failed: the stage run and the pipeline run end as `status` (none stays RUNNING);
        the stage job is left running, and how to stop it is said."""
        if self._stage_run is not None:
            self._stage_run.finish(status)
        parent.finish(status)
        left = self.left_running()
        if left:
            self.say(f"runner stopped ({status}){left}")

    def left_running(self) -> str:
        """'; Ray job ID keeps running ...' when the stage job followed now is PENDING/RUNNING, else ''."""
        if self.job_id is None or str(self.client.get_job_info(self.job_id).status) not in jobs.ACTIVE:
            return ""
        return (f"; Ray job {self.job_id} keeps running: a rerun attaches to it, or stop it with: "
                f"ray job stop {self.job_id} --address {self.address}")

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
        if force and exists(fs, path):  # run() refused --from while a job of this stage runs
            self.say(f"[{stage.name}] --from: deleting the previous output {stage.folder}")
            fs.delete_dir(path)
        run = self._stage_run = StageRun.open(
            tracking_uri=self.tracking_uri, experiment=self.experiment, stage_key=stage.stage_key,
            run_name=stage.name, parent_run_id=parent_id,
            tags={DAG_STAGE_TAG: stage.name, DAG_KIND_TAG: stage.kind, DAG_DIGEST_TAG: stage.digest})
        data = job_config(self.config, stage, {n: r.outputs for n, r in results.items()},
                          tracking_uri=self.tracking_uri, parent_run_id=parent_id)
        if not KINDS[stage.kind].tracked:
            run.log_params(data)
        log = self.log_dir / f"{stage.name}.log"
        started = time.monotonic()
        status, message = self._follow(stage, data, log)
        run.log_artifact(log, "logs")
        self.job_id, self._stage_run = None, None
        if status != "SUCCEEDED":
            run.set_tags({DAG_ERROR_TAG: message})
            run.finish("FAILED")
            self.say(f"[{stage.name}] FAILED ({message}); log: {log}")
            return StageResult(stage.name, "failed", log=str(log), message=message)
        return self._done(stage, run, log, took=time.monotonic() - started)

    def _done(self, stage: StagePlan, run: StageRun, log: Path, *, took: float) -> StageResult:
        outputs = stage.outputs()
        state = run.state()
        if stage.kind == "train":
            outputs["checkpoint"] = state.tags[CHECKPOINT_TAG]
        run.set_tags({**{DAG_OUTPUT_TAG + k: v for k, v in outputs.items()}, DAG_DONE_TAG: stage.digest})
        run.finish("FINISHED")
        self.say(f"[{stage.name}] done in {duration(took)}: " + ", ".join(f"{k} {v}" for k, v in outputs.items()))
        return StageResult(stage.name, "done", outputs, _own_metrics(state.metrics), str(log))

    def _gate(self, stage: StagePlan, result: StageResult, results: dict[str, StageResult]) -> StageResult:
        """A done or skipped stage's quality gate (pipelines/dag/gates.py), checked on every metric its run
        logged, its verdict tagged on the run (GATE_TAG). Failed, the result becomes gate_failed: its dependents
        do not run, and the message names the metric, its value and the bound."""
        gate = self.config.stages[stage.name].gate
        if gate is None or result.status not in ("done", "skipped"):
            return result
        run = StageRun.find(tracking_uri=self.tracking_uri, experiment=self.experiment, stage_key=stage.stage_key)
        metrics = run.state().metrics
        reference = results[gate.no_worse_than].metrics if gate.no_worse_than else None
        verdict = gates.check(gate, metrics=metrics, reference=reference)
        run.set_tags({GATE_TAG: verdict.tag})
        if gate.metric in metrics:  # shown in the report and the comparison, whatever its name
            result.metrics[gate.metric] = metrics[gate.metric]
        if verdict.passed:
            self.say(f"[{stage.name}] gate passed: {verdict.text}")
            return result
        message = f"gate of {stage.name} failed: {verdict.text}"
        self.say(f"[{stage.name}] {message}")
        return replace(result, status="gate_failed", message=message)

    def _follow(self, stage: StagePlan, data: dict, log: Path) -> tuple[str, str]:
        """Attach to the stage's job when one still runs, else submit the next attempt; stream its log (from
        the job's start: the file holds each line once) to `log`, and what a person reads of it
        (pipelines/progress.py StageConsole) here; (final status, message)."""
        pipeline = self.config.pipeline.name
        running = jobs.active_job(self.client, pipeline, stage)
        if running is not None:
            self.job_id = running.submission_id
            self.say(f"[{stage.name}] attached to Ray job {self.job_id} ({running.status}), left running before")
        else:
            attempt = 1 + max((j.attempt for j in jobs.stage_jobs(self.client, pipeline, stage)), default=0)
            self.job_id = jobs.submit(self.client, self.config, stage, data, attempt=attempt)
            self.say(f"[{stage.name}] submitted {KINDS[stage.kind].job} as Ray job {self.job_id}")
        log.parent.mkdir(parents=True, exist_ok=True)
        console = StageConsole(stage.name, out=self.out, verbose=self.verbose, tty=self.out.isatty())
        with open(log, "w") as f:
            try:
                jobs.tail(self.client, self.job_id, f, console.feed)
            finally:
                console.close()
        info = self.client.get_job_info(self.job_id)
        return str(info.status), redact_text(f"Ray job {self.job_id} {info.status}: {(info.message or '').strip()}")


def _own_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """What the final report and the parent run show of a stage run: evaluation scores and the last loss."""
    return {k: v for k, v in metrics.items() if k in EVAL_METRICS or k in ("loss", "psnr")}


def format_results(results: list[StageResult]) -> str:
    lines = ["", "stage                status      outputs / metrics"]
    for r in results:
        detail = ", ".join(f"{k}={v:.3f}" for k, v in sorted(r.metrics.items()))
        where = r.outputs.get("checkpoint") or r.outputs.get("report") or next(iter(r.outputs.values()), "")
        lines.append(f"{r.name:20s} {r.status:11s} {where}{'  ' + detail if detail else ''}"
                     f"{'  ' + r.message if r.status in ('failed', 'gate_failed', 'blocked') else ''}")
    return "\n".join(lines)
