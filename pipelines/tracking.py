"""MLflow tracking: the only module that imports mlflow.

One parent run per pipeline, one child run per stage (`precompute`, `train-vae`, `train-256`, ...). A stage
run is found again by its `hdm.stage_key` tag, so a stage that restarts after a failure reopens its run
instead of creating a new one. Runs are addressed by id through `MlflowClient` (no global active run), so
any process (a Ray Train worker, the driver) can log to the same run. Without a tracking URI every call is
a no-op: tracking is optional.

MLflow is not a hard dependency of training: on a worker (`attach(worker=True)`) metrics and tags go into a
bounded buffer a background thread sends (pipelines/tracking_buffer.py) and no call raises into training; on
the driver, calls are retried for up to `patience_s`, then `TrackingUnavailable`. Everything written to a run
(params, tags, text artifacts) passes pipelines.secrets first.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import TrackingOptions
from pipelines.secrets import redact, redact_text
from pipelines.tracking_buffer import MetricBuffer, retry

# Every tag name the jobs set or read, defined here only.
STAGE_KEY = "hdm.stage_key"  # finds a stage's run again when it restarts
PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "hdm.stage"  # which job made the run: STAGE_TRAIN, STAGE_VAE, STAGE_EVALUATE
STAGE_TRAIN, STAGE_VAE, STAGE_EVALUATE = "train", "train-vae", "evaluate"
# A training stage's lineage: its resolution, model preset and text encoder (what `--init-from auto` matches
# on), the weights it started from and the run that made them, and its final checkpoint URI.
RES_TAG, MODEL_TAG, TEXT_ENCODER_TAG = "hdm.res", "hdm.model", "hdm.text_encoder"
INIT_FROM_TAG, PREV_RUN_TAG, CHECKPOINT_TAG = "hdm.init_from", "hdm.prev_run", "hdm.checkpoint"
INIT_REQUEST_TAG = "hdm.init_from_requested"  # the --init-from value the recorded source was resolved from
LATENTS_TAG, LATENTS_DIGEST_TAG = "hdm.latents", "hdm.latents_digest"  # the latent set a stage trained on
INIT_WEIGHTS_TAG = "hdm.init_weights_sha256"  # sha256 of the starting weights (a fresh start records none)
FINAL_WEIGHTS_TAG = "hdm.final_weights_sha256"
RESUMED_AT_TAG = "hdm.resumed_at_step"  # the step a relaunched training stage resumed from
INPUT_TAG, VAE_OUTPUT_TAG = "hdm.input", "hdm.output"  # the EQ-VAE job's images and its saved VAE
EVALUATED_TAG = "hdm.evaluated"  # the checkpoint an evaluate stage scored
# Set by the DAG runner on each stage's run (the jobs set their own tags above).
DAG_STAGE_TAG, DAG_KIND_TAG, DAG_DIGEST_TAG = "hdm.dag.stage", "hdm.dag.kind", "hdm.dag.digest"
DAG_DONE_TAG = "hdm.dag.done"  # the digest of the config the stage finished with
DAG_ERROR_TAG = "hdm.dag.error"
DAG_OUTPUT_TAG = "hdm.output."  # + output name: a URI a dependent stage reads
GATE_TAG = "hdm.gate"  # a stage's quality gate (pipelines/dag/gates.py): "passed: ..." or "failed: ..."
METRICS_DROPPED_TAG = "hdm.metrics_dropped"  # metric points a worker's full buffer dropped during an outage
# MLflow 3 opens an experiment on the tab its kind names (GenAI traces when untagged): ours are model training
EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"

PATIENCE_S = 300.0  # how long a call (or the final flush) waits for an unreachable server
TEXT_SUFFIXES = (".log", ".txt", ".json", ".toml", ".yaml", ".yml")  # artifacts redacted before upload
# MLflow's HTTP client retries a call for minutes by default (7 retries, backoff factor 2, 120 s timeout):
# our own loops retry instead, so that a call fails within seconds and a stopped server never stalls them.
# setdefault: a value the user set explicitly wins.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server did not answer within the patience allowed (its URI is in the message)."""


class Terminated(BaseException):
    """SIGTERM reached the job (`ray job stop`): raised in the main thread so that its cleanup runs."""


_ENDING: list[StageRun] = []  # the runs inside `ending_on_error` blocks now: what a SIGTERM marks KILLED
SIGTERM_PATIENCE_S = 2.0  # `ray job stop` SIGKILLs 3 s after its SIGTERM (RAY_JOB_STOP_WAIT_TIME_S)


def check_reachable(tracking_uri: str, *, timeout_s: float = 10.0) -> None:
    """Raise TrackingUnavailable naming `tracking_uri` when an http(s) tracking server does not answer its
    /health within `timeout_s` (one request, no retries); a local store (sqlite, a path) is always reachable.
    Any HTTP answer below 500 counts (a server behind a login answers 401)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    url = f"{tracking_uri.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return
    except urllib.error.HTTPError as e:
        if e.code < 500:
            return
        reason = f"HTTP {e.code}"
    except (OSError, ValueError) as e:  # refused, timed out, no route, a malformed URI
        reason = str(getattr(e, "reason", e))
    raise TrackingUnavailable(f"MLflow tracking server {tracking_uri} is unreachable ({url}: {reason}); start it, "
                              "or pass the URI it answers on (--mlflow-uri)")


def raise_on_sigterm() -> None:
    """From now on SIGTERM marks the runs inside `ending_on_error` blocks KILLED and raises `Terminated` in the
    main thread (a job's `except`/`finally` paths run) instead of ending the process where it stands. Call it
    after `ray.init()`, which installs its own handler."""
    def handler(signum, frame):
        # Marked here, not only where the exception lands: raised inside a blocking Ray call (`fit`'s wait),
        # it may be swallowed there, and the SIGKILL that follows leaves no time to wait for it.
        for run in list(_ENDING):
            try:
                run.finish("KILLED", patience_s=SIGTERM_PATIENCE_S)
            except Exception as error:
                print(f"tracking: could not mark run {run.run_id} KILLED: {error}", file=sys.stderr, flush=True)
        raise Terminated(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
        signal.signal(signal.SIGTERM, handler)


def _client(tracking_uri: str):
    """An MlflowClient whose HTTP calls fail within seconds (HTTP_DEFAULTS)."""
    from mlflow import MlflowClient

    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    return MlflowClient(tracking_uri=tracking_uri)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: nested config -> MLflow params."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


@dataclass(frozen=True)
class RunState:
    status: str  # RUNNING, FINISHED, FAILED, KILLED; NONE without a run
    tags: dict[str, str]
    metrics: dict[str, float]


class StageRun:
    """An MLflow run for one stage, created or reopened by `open` (the driver) or `attach`ed to by id.

    On the driver every call is retried for up to `patience_s` while the server does not answer, then raises
    TrackingUnavailable. On a worker (`attach(worker=True)`) nothing raises into training: metrics and tags
    are buffered and sent by a background thread (`flush` at the end), other calls are tried once and a
    failure is printed."""

    def __init__(self, client, run_id: str | None, *, worker: bool = False, resume_metric: str | None = None,
                 logged_since_ms: int | None = None, patience_s: float = PATIENCE_S):
        self.client, self.run_id, self.worker, self.patience_s = client, run_id, worker, patience_s
        self.resume_metric, self.logged_since_ms = resume_metric, logged_since_ms
        self._buffer: MetricBuffer | None = None
        self.ended: str | None = None  # the status `finish` marked the run with

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    @classmethod
    def open(cls, *, tracking_uri: str | None, experiment: str, stage_key: str, run_name: str,
             parent_run_id: str | None = None, tags: Mapping[str, str] | None = None) -> StageRun:
        """The run tagged `stage_key` in `experiment` (reopened: status RUNNING), or a new one. Retried as a
        whole while the server does not answer: a retry finds a run the lost answer created by its key."""
        if not tracking_uri:
            return cls(None, None)
        client = _client(tracking_uri)
        all_tags = {STAGE_KEY: stage_key, **{k: redact_text(str(v)) for k, v in (tags or {}).items()}}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run_id = retry(lambda: _open_run(client, tracking_uri, experiment, all_tags, run_name), patience_s=PATIENCE_S,
                       what=f"opening the MLflow run {stage_key!r} at {tracking_uri}", unavailable=TrackingUnavailable)
        return cls(client, run_id)

    @classmethod
    def for_job(cls, tracking: TrackingOptions, *, default_key: str, default_name: str,
                tags: Mapping[str, Any]) -> StageRun:
        """A job's own stage run: `open` with the job's tracking options, where the DAG's stage key and run
        name (when a DAG runs the job) win over the job's defaults."""
        return cls.open(tracking_uri=tracking.resolved_uri(), experiment=tracking.experiment,
                        stage_key=tracking.stage_key or default_key, run_name=tracking.run_name or default_name,
                        parent_run_id=tracking.parent_run_id, tags=tags)

    @classmethod
    def attach(cls, *, tracking_uri: str | None, run_id: str | None, worker: bool = False,
               resume_metric: str | None = None, logged_since_ms: int | None = None) -> StageRun:
        """A handle on an existing run (e.g. in a Ray Train worker, from the id the driver opened). `worker`:
        buffered, never raising (see the class). `resume_metric`: steps at or below the last step of this
        metric in the run's history (counting only points stamped at or after `logged_since_ms` when given)
        are not logged again: a resumed stage logs each step once."""
        if not tracking_uri or not run_id:
            return cls(None, None)
        return cls(_client(tracking_uri), run_id, worker=worker, resume_metric=resume_metric,
                   logged_since_ms=logged_since_ms)

    @classmethod
    def find(cls, *, tracking_uri: str | None, experiment: str, stage_key: str) -> StageRun:
        """The run tagged `stage_key` in `experiment`, untouched; a disabled handle when there is none."""
        if not tracking_uri:
            return cls(None, None)
        client = _client(tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        found = [] if exp is None else _runs_tagged(client, exp.experiment_id, {STAGE_KEY: stage_key}, max_results=1)
        return cls(client, found[0].info.run_id if found else None)

    def state(self) -> RunState:
        """Status, tags and latest metrics of the run, read now."""
        if not self.enabled:
            return RunState("NONE", {}, {})
        run = self.client.get_run(self.run_id)
        return RunState(run.info.status, dict(run.data.tags), dict(run.data.metrics))

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        def send():
            existing = self.client.get_run(self.run_id).data.params  # a reopened run keeps its params
            items = [Param(k, v) for k, v in flatten(redact(params)).items() if k not in existing]  # no credentials
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i:i + 100])
        self._call(send, "log_params")

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        """Metric values at `step`, stamped now (the stamp a resend keeps). Buffered on a worker."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if self.worker:
            self._sender().add(points)
        else:
            self._call(lambda: self.client.log_batch(self.run_id, metrics=points), f"log_metrics at step {step}")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Tags, their values redacted. Buffered on a worker."""
        if not self.enabled or not tags:
            return
        from mlflow.entities import RunTag

        values = {k: redact_text(str(v)) for k, v in tags.items()}
        if self.worker:
            self._sender().add(tags=values)
        else:
            self._call(lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in values.items()]),
                       f"set_tags {sorted(values)}")

    def log_image(self, image, artifact_file: str) -> None:
        """A PIL image or an (H, W, 3) uint8 array as an artifact (e.g. "grids/step-100.png")."""
        self._call(lambda: self.client.log_image(self.run_id, image, artifact_file=artifact_file), artifact_file)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file (text files redacted: TEXT_SUFFIXES) or a directory, as it is, under `artifact_path`."""
        path = Path(path)
        if path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
            name = f"{artifact_path}/{path.name}" if artifact_path else path.name
            self.log_text(path.read_text(errors="replace"), name)
        else:
            self._call(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path), str(path))

    def log_text(self, text: str, artifact_file: str) -> None:
        """`text`, redacted, as the artifact `artifact_file`."""
        if not self.enabled:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(redact_text(text))
            parent = str(Path(artifact_file).parent)
            self._call(lambda: self.client.log_artifact(self.run_id, str(path), None if parent == "." else parent),
                       artifact_file)

    def flush(self, timeout_s: float | None = None) -> int:
        """Wait up to `timeout_s` (default `patience_s`) for the buffered metrics and tags to reach the server;
        the number left unsent (0: all sent). Never raises."""
        if self._buffer is None:
            return 0
        return self._buffer.flush(self.patience_s if timeout_s is None else timeout_s)

    def close(self, timeout_s: float | None = None) -> None:
        """A worker's end: `flush`, then say what was dropped (a full buffer) or could not be sent."""
        buffer = self._buffer
        if buffer is None:
            return
        if buffer.dropped:
            buffer.add(tags={METRICS_DROPPED_TAG: str(buffer.dropped)})
        left = self.flush(timeout_s)
        if buffer.dropped or left:
            print(f"tracking: run {self.run_id}: {buffer.dropped} metric points dropped (buffer full), {left} not "
                  f"sent (last error: {buffer.last_error})", file=sys.stderr, flush=True)

    def finish(self, status: str = "FINISHED", *, patience_s: float | None = None) -> None:
        """Mark the run `status` (retried up to `patience_s`, by default the run's, then TrackingUnavailable)."""
        if not self.enabled or self.ended == status:
            return
        patience_s = self.patience_s if patience_s is None else patience_s
        self.close(timeout_s=patience_s)
        retry(lambda: self.client.set_terminated(self.run_id, status=status), patience_s=patience_s,
              what=f"marking MLflow run {self.run_id} {status}", unavailable=TrackingUnavailable)
        self.ended = status

    @contextmanager
    def ending_on_error(self) -> Iterator[StageRun]:
        """The block's errors end the run: FAILED on an exception, KILLED on SIGTERM (`Terminated`, with
        `raise_on_sigterm`) or Ctrl-C; the error is raised again. A failure to mark it never hides the error;
        TrackingUnavailable passes unmarked, and so does an error an inner block marked already (`fit`'s)."""
        _ENDING.append(self)
        try:
            yield self
        except TrackingUnavailable:
            raise  # the server is away: marking the run would wait as long again, in vain
        except BaseException as error:
            if self.ended is not None:  # marked already (an inner block, the SIGTERM handler)
                raise
            status = "KILLED" if isinstance(error, (Terminated, KeyboardInterrupt)) else "FAILED"
            try:
                self.finish(status)
            except Exception as mark_error:
                print(f"tracking: could not mark run {self.run_id} {status}: {mark_error}", file=sys.stderr, flush=True)
            raise
        finally:
            _ENDING.remove(self)

    def _call(self, call: Callable[[], Any], what: str) -> None:
        """`call()` on an enabled run: on the driver retried (then TrackingUnavailable), on a worker tried once
        and a failure printed, never raised into training."""
        if not self.enabled:
            return
        if not self.worker:
            retry(call, patience_s=self.patience_s, what=f"MLflow {what} (run {self.run_id})",
                  unavailable=TrackingUnavailable)
            return
        try:
            call()
        except Exception as error:
            print(f"tracking: {what} not logged to run {self.run_id}: {error}"[:800], file=sys.stderr, flush=True)

    def _sender(self) -> MetricBuffer:
        if self._buffer is None:
            self._buffer = MetricBuffer(self._send, skip_through=self._last_step if self.resume_metric else None)
        return self._buffer

    def _send(self, metrics: list, tags: list[tuple[str, str]]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags])

    def _last_step(self) -> int | None:
        """The last step of `resume_metric` in the run's history, since `logged_since_ms` (None: none)."""
        history = self.client.get_metric_history(self.run_id, self.resume_metric)
        since = self.logged_since_ms or 0
        return max((m.step for m in history if m.timestamp >= since), default=None)


def _open_run(client, tracking_uri: str, experiment: str, tags: Mapping[str, str], run_name: str) -> str:
    """The id of the run carrying `tags[STAGE_KEY]` in `experiment` (reopened: RUNNING, tags set), else of a
    new one; the experiment is created when missing."""
    from mlflow.entities import RunTag

    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(
        experiment, artifact_location=_artifact_location(tracking_uri, experiment),
        tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    found = _runs_tagged(client, exp_id, {STAGE_KEY: tags[STAGE_KEY]}, max_results=1)
    if not found:
        return client.create_run(exp_id, tags=dict(tags), run_name=run_name).info.run_id
    run_id = found[0].info.run_id
    client.update_run(run_id, status="RUNNING")
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return run_id


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of a sqlite store live beside the database (MLflow's default is ./mlruns of whatever
    directory the process runs in); a server decides for itself (None)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "artifacts" / experiment).as_uri()


@dataclass(frozen=True)
class RunRecord:
    """A run as a search returns it: enough to choose among runs and say which was chosen."""

    run_id: str
    name: str
    status: str
    tags: dict[str, str]


def search_runs(tracking_uri: str, *, experiment: str, tags: Mapping[str, str]) -> list[RunRecord]:
    """The runs of `experiment` carrying every tag of `tags` with that value, newest start first (none when
    the experiment does not exist)."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return [RunRecord(r.info.run_id, r.info.run_name, r.info.status, dict(r.data.tags))
            for r in _runs_tagged(client, exp.experiment_id, tags, max_results=5000)]


def _runs_tagged(client, experiment_id: str, tags: Mapping[str, str], *, max_results: int) -> list:
    """MLflow's runs of the experiment carrying every tag of `tags` with that value, newest start first."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"],
                              max_results=max_results)


def checkpoint_uri_of_run(tracking_uri: str, run_id: str, *, tag: str = CHECKPOINT_TAG) -> str:
    """The final checkpoint URI (local path or s3://) a training stage run recorded in its `tag`."""
    uri = _client(tracking_uri).get_run(run_id).data.tags.get(tag)
    if not uri:
        raise LookupError(f"MLflow run {run_id} has no {tag!r} tag: no final checkpoint recorded yet")
    return uri
