"""The pipeline DAG as data: a TOML file of stages, validated, planned, and run stage by stage as Ray jobs.

    [pipeline]
    name = "demo"                 # also the MLflow experiment unless [pipeline.tracking] says otherwise
    storage = "runs/demo"         # every stage writes under STORAGE/STAGE/DIGEST (local path or s3://)

    [stages.train-64]
    kind = "train"                # one of KINDS: which job runs, which inputs it takes from its needs
    needs = ["precompute"]        # its latents come from the precompute stage's output
    params = { res = 64, steps = 300 }   # fields of the job's own config model (TrainStageConfig here)
    plan = { throughput = 20.0 }  # samples/s per worker, for --dry-run's time estimate

    [stages.train-128]
    extends = "train-64"          # train-64's kind and params (resolve_extends), plus these
    needs = ["precompute", "train-64"]
    params = { res = 128 }

A stage's outputs are inputs of its dependents (the wiring in KINDS); no path is written twice. `${NAME}` in
a string is the environment variable NAME. A stage's digest hashes its kind, its resolved params (its
parent's included) and the digests of the stages it reads from, so a changed stage reruns with everything
downstream of it and every stage that extends it, and an unchanged one is skipped when its MLflow run
finished. This module plans; `pipelines/dag/runner.py` submits the jobs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from pipelines.config import ConfigError, S3Options, StrictModel, TrackingOptions, check_uri, describe_errors
from pipelines.dag.gates import GateSpec, check_gates
from pipelines.secrets import has_uri_password, is_secret_name, redact_text
from pipelines.train.config import derive_params


@dataclass(frozen=True)
class Input:
    """A config field of a stage filled from the output of a stage it needs (of kind `kind`)."""

    field: str
    kind: str
    output: str
    required: bool = True


@dataclass(frozen=True)
class Kind:
    """A kind of stage: the job that runs it, the job's config model, where its output goes, its inputs.

    `outputs` maps each output name to the path under the stage's folder it lives at ("" = the folder);
    `checkpoint` is the exception: a training stage's final checkpoint URI, read from its MLflow run.
    `tracked`: the job logs to the stage's MLflow run itself (the runner passes it `tracking.*`).
    """

    job: str
    config: str  # "module:Class", imported when needed (keeps this module light)
    output_field: str
    outputs: dict[str, str]
    inputs: tuple[Input, ...] = ()
    tracked: bool = False

    def model(self) -> type[BaseModel]:
        module, name = self.config.split(":")
        return getattr(__import__(f"pipelines.{module}", fromlist=[name]), name)


KINDS: dict[str, Kind] = {
    "demo_data": Kind("jobs/make_demo_data.py", "data.demo_data:DemoDataConfig", "out",
                      {"urls": "urls.parquet", "prompts": "heldout.txt"}),
    "ingest": Kind("jobs/ingest.py", "data.ingest:IngestConfig", "output", {"dataset": ""},
                   (Input("url_list", "demo_data", "urls", required=False),)),
    "vae": Kind("jobs/train_vae.py", "train.config:VAETrainConfig", "output", {"vae": ""},
                (Input("input", "ingest", "dataset", required=False),), tracked=True),
    "precompute": Kind("jobs/precompute_latents.py", "data.config:PrecomputeConfig", "output", {"latents": ""},
                       (Input("input", "ingest", "dataset", required=False), Input("vae", "vae", "vae", required=False))),
    "train": Kind("jobs/train_stage.py", "train.config:TrainStageConfig", "storage", {"checkpoint": ""},
                  (Input("latents", "precompute", "latents", required=False),
                   Input("init_from", "train", "checkpoint", required=False)), tracked=True),
    "evaluate": Kind("jobs/evaluate.py", "eval.evaluate:EvaluateConfig", "out", {"report": ""},
                     (Input("checkpoint", "train", "checkpoint"),
                      Input("prompt_file", "demo_data", "prompts", required=False)), tracked=True),
    "sample": Kind("jobs/sample.py", "eval.sampling:SampleConfig", "out", {"images": ""},
                   (Input("checkpoint", "train", "checkpoint"),)),
}


class PlanFigures(StrictModel):
    """Throughput figures for --dry-run's estimates (measured elsewhere, e.g. benchmarks/gpu_check.sh)."""

    throughput: float | None = Field(None, gt=0)  # samples/s per worker (train, vae); images/s (ingest, precompute)
    images: int | None = Field(None, ge=1)  # images this stage reads (default: [pipeline] images)


class StageSpec(StrictModel):
    kind: Literal["demo_data", "ingest", "vae", "precompute", "train", "evaluate", "sample"] | None = None
    extends: str | None = None  # a stage whose kind and params this one starts from (resolve_extends)
    needs: list[str] = []  # never inherited
    params: dict[str, Any] = {}  # after validation: resolved, the parent's included
    plan: PlanFigures = PlanFigures()  # never inherited
    gate: GateSpec | None = None  # checked once the stage finished (pipelines/dag/gates.py); never inherited

    @model_validator(mode="after")
    def _kind(self) -> StageSpec:
        if self.kind is None and self.extends is None:
            raise ValueError("kind is missing (or say which stage this one `extends`)")
        return self


class DagTrackingOptions(TrackingOptions):
    """The pipeline's MLflow: `uri` is where the runner reaches it; `cluster_uri`, when set, is what the stage
    jobs get instead (the runner on a laptop through a port-forward, the jobs inside the cluster)."""

    cluster_uri: str | None = None


class DagOptions(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    storage: str  # root of every stage's output: local path (relative to the working directory) or s3://
    images: int | None = Field(None, ge=1)  # dataset size, for --dry-run's estimates
    use_gpu: bool | None = None  # GPU-hours in the plan count workers of stages that use GPUs
    tracking: DagTrackingOptions = DagTrackingOptions()
    s3: S3Options = S3Options()
    # Environment variables passed from the runner's environment to every job, names only (missing ones are
    # skipped). Never credentials: a job's runtime env is shown by the Ray dashboard and job API and logged by
    # Ray's agent, so secret names are refused; the cluster's nodes hold their own (docs/node.md, docs/kubernetes.md).
    forward_env: list[str] = ["AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "HF_HUB_OFFLINE",
                              "NO_ALBUMENTATIONS_UPDATE"]

    @field_validator("forward_env")
    @classmethod
    def _no_secrets(cls, names: list[str]) -> list[str]:
        secret = [n for n in names if is_secret_name(n)]
        if secret:
            raise ValueError(f"{', '.join(secret)}: a credential is never forwarded to a job (its runtime env is "
                             "visible in the Ray dashboard and job API); give it to the cluster's nodes in their "
                             "own environment instead (docs/node.md, docs/kubernetes.md)")
        return names

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str) -> str:
        return check_uri(value)


ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(value: Any) -> Any:
    """`${NAME}` in every string of a nested config replaced by the environment variable NAME (a path that
    differs per machine, a bucket); an unset variable is an error that names it."""
    if isinstance(value, str):
        def sub(match: re.Match) -> str:
            if match.group(1) not in os.environ:
                raise ValueError(f"${{{match.group(1)}}} in {value!r}: environment variable {match.group(1)} is not set")
            return os.environ[match.group(1)]
        return ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    return value


class DagConfig(StrictModel):
    pipeline: DagOptions
    stages: dict[str, StageSpec] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _env(cls, data: Any) -> Any:
        return expand_env(data)

    @field_validator("stages")
    @classmethod
    def _names(cls, stages: dict[str, StageSpec]) -> dict[str, StageSpec]:
        for name in stages:
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"stage name {name!r}: use letters, digits, '-' and '_'")
        return stages

    @field_validator("stages")
    @classmethod
    def _extends(cls, stages: dict[str, StageSpec]) -> dict[str, StageSpec]:
        return resolve_extends(stages)

    @model_validator(mode="after")
    def _graph(self) -> DagConfig:
        for name, spec in self.stages.items():
            for need in spec.needs:
                if need not in self.stages:
                    raise ValueError(f"stage {name!r} needs {need!r}, which is not a stage of this pipeline "
                                     f"(stages: {', '.join(self.stages)})")
        try:
            self.order()
        except CycleError as e:
            raise ValueError(f"the stages' needs form a cycle: {' -> '.join(e.args[1])}") from None
        for name in self.stages:
            self.wiring(name)  # raises on a missing or ambiguous input
        check_gates(self)
        return self

    def order(self) -> list[str]:
        """Stages in dependency order; ties keep the file's order."""
        sorter = TopologicalSorter({n: s.needs for n, s in self.stages.items()})
        sorter.prepare()
        order: list[str] = []
        rank = {n: i for i, n in enumerate(self.stages)}
        while sorter.is_active():
            ready = sorted(sorter.get_ready(), key=rank.__getitem__)
            order.extend(ready)
            sorter.done(*ready)
        return order

    def wiring(self, name: str) -> dict[str, tuple[str, str]]:
        """{config field: (upstream stage, its output)} for stage `name`."""
        spec = self.stages[name]
        kind = KINDS[spec.kind]
        wired: dict[str, tuple[str, str]] = {}
        for inp in kind.inputs:
            sources = [n for n in spec.needs if self.stages[n].kind == inp.kind]
            if len(sources) > 1:
                raise ValueError(f"stage {name!r}: {inp.field} could come from any of {sources}; "
                                 f"need only one stage of kind {inp.kind!r}")
            if sources:
                if inp.field in spec.params:
                    raise ValueError(f"stage {name!r}: params.{inp.field} is also the output of {sources[0]!r}; "
                                     "drop one of them")
                wired[inp.field] = (sources[0], inp.output)
            elif inp.required and inp.field not in spec.params:
                raise ValueError(f"stage {name!r} (kind {spec.kind}) needs a stage of kind {inp.kind!r} "
                                 f"(for {inp.field}) or params.{inp.field}")
        return wired

    def descendants(self, name: str) -> set[str]:
        """`name` and every stage that depends on it, directly or not."""
        out, todo = {name}, [name]
        while todo:
            current = todo.pop()
            for n, s in self.stages.items():
                if current in s.needs and n not in out:
                    out.add(n)
                    todo.append(n)
        return out


def _lineage(stages: dict[str, StageSpec], name: str) -> list[str]:
    """`name`, the stage it extends, that stage's parent, ... up to a stage that extends none."""
    line = [name]
    while (parent := stages[line[-1]].extends) is not None:
        if parent not in stages:
            raise ValueError(f"stage {line[-1]!r} extends {parent!r}, which is not a stage of this pipeline "
                             f"(stages: {', '.join(stages)})")
        if parent in line:
            raise ValueError(f"stage {name!r}: extends form a cycle: {' -> '.join([*line, parent])}")
        line.append(parent)
    return line


def inherit(kind: str, parent: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """A stage's params from its parent's and its own: a training stage's by TrainStageConfig's derive rule
    (recipe values follow the new resolution), other kinds' by a plain merge; a table replaces the parent's."""
    return derive_params(parent, own) if kind == "train" else {**parent, **own}


def resolve_extends(stages: dict[str, StageSpec]) -> dict[str, StageSpec]:
    """Every stage with its kind and params resolved: a stage that `extends` another takes its kind (an
    explicit one must agree) and its resolved params, minus the inputs this stage's own needs provide
    (those are wired, not copied), merged with its own params by `inherit`."""
    kinds: dict[str, str] = {}
    for name in stages:
        line = _lineage(stages, name)
        kind = stages[line[-1]].kind
        for child, parent in reversed(list(itertools.pairwise(line))):
            if stages[child].kind not in (None, kind):
                raise ValueError(f"stage {child!r} (kind {stages[child].kind}) extends {parent!r} (kind {kind}): "
                                 "a stage extends only a stage of its own kind")
        kinds[name] = kind

    def params(name: str) -> dict[str, Any]:
        spec = stages[name]
        if spec.extends is None:
            return dict(spec.params)
        wired = {inp.field for inp in KINDS[kinds[name]].inputs if any(kinds.get(n) == inp.kind for n in spec.needs)}
        inherited = {k: v for k, v in params(spec.extends).items() if k not in wired}
        return inherit(kinds[name], inherited, spec.params)

    return {name: spec.model_copy(update={"kind": kinds[name], "params": params(name)})
            for name, spec in stages.items()}


def storage_root(config: DagConfig, cwd: Path | None = None) -> str:
    """The storage URI with a local path made absolute (jobs run in another working directory)."""
    root = config.pipeline.storage
    if root.startswith("s3://"):
        return root
    if root.startswith("file://"):
        root = root[len("file://"):]
    return str(((cwd or Path.cwd()) / root).resolve())


def uri_join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


@dataclass
class StagePlan:
    """One stage, resolved: its digest, its output folder and the job config it gets (inputs that are
    only known once upstream stages ran, i.e. training checkpoints, are filled in by the runner)."""

    name: str
    kind: str
    digest: str
    folder: str
    params: dict[str, Any]
    wiring: dict[str, tuple[str, str]]
    needs: list[str] = field(default_factory=list)

    @property
    def stage_key(self) -> str:
        return f"{self.name}/{self.digest[:12]}"

    def outputs(self) -> dict[str, str]:
        """Outputs known before the stage runs (everything but a training checkpoint)."""
        return {k: uri_join(self.folder, rel) if rel else self.folder
                for k, rel in KINDS[self.kind].outputs.items() if k != "checkpoint"}


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def plan(config: DagConfig, cwd: Path | None = None) -> list[StagePlan]:
    """Every stage in order with its digest and folder."""
    root = storage_root(config, cwd)
    digests: dict[str, str] = {}
    plans: list[StagePlan] = []
    for name in config.order():
        spec = config.stages[name]
        wiring = config.wiring(name)
        upstream = {f: f"{src}@{digests[src]}:{out}" for f, (src, out) in sorted(wiring.items())}
        digest = hashlib.sha256(_canonical({"kind": spec.kind, "params": spec.params, "inputs": upstream,
                                            "s3": config.pipeline.s3.model_dump()}).encode()).hexdigest()
        digests[name] = digest
        plans.append(StagePlan(name, spec.kind, digest, uri_join(root, name, digest[:12]), dict(spec.params), wiring,
                               list(spec.needs)))
    return plans


def job_config(config: DagConfig, stage: StagePlan, upstream_outputs: dict[str, dict[str, str]], *,
               tracking_uri: str | None, parent_run_id: str | None) -> dict[str, Any]:
    """The config a stage's job gets: its params, its wired inputs, its output folder, shared options."""
    kind = KINDS[stage.kind]
    data = dict(stage.params)
    for field_name, (source, output) in stage.wiring.items():
        data[field_name] = upstream_outputs[source][output]
    if stage.kind == "train":
        data.setdefault("init_from", "none")  # a first stage starts fresh; later ones are wired above
        data["storage"], data["name"] = stage.folder.rsplit("/", 1)[0], stage.digest[:12]  # run dir = folder
    else:
        data[kind.output_field] = stage.folder
    model = kind.model()
    if "s3" in model.model_fields:
        data["s3"] = {**config.pipeline.s3.model_dump(exclude_none=True), **data.get("s3", {})}
    if kind.tracked:
        uri = jobs_tracking_uri(config, tracking_uri)
        data["tracking"] = {**data.get("tracking", {}), "uri": uri, "experiment": experiment(config),
                            "parent_run_id": parent_run_id, "stage_key": stage.stage_key, "run_name": stage.name}
    return data


def jobs_tracking_uri(config: DagConfig, tracking_uri: str | None) -> str | None:
    """Where tracked stage jobs reach MLflow: `cluster_uri`, else the runner's URI; never one with a password
    (it would travel in the job's entrypoint, which the Ray job list shows)."""
    uri = config.pipeline.tracking.cluster_uri or tracking_uri
    if uri and has_uri_password(uri):
        raise ValueError(f"tracking URI {redact_text(uri)}: a password in the URI would be shown in the Ray job list; "
                         "give the nodes MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD in their own environment")
    return uri


def experiment(config: DagConfig) -> str:
    tracking = config.pipeline.tracking
    return tracking.experiment if "experiment" in tracking.model_fields_set else config.pipeline.name


def validate_stage(config: DagConfig, stage: StagePlan) -> BaseModel:
    """The stage's job config, validated by the job's own model, with placeholders for upstream outputs."""
    placeholders = {s: {o: uri_join(storage_root(config), s, "<output>") for o in KINDS[config.stages[s].kind].outputs}
                    for s in config.stages}
    data = job_config(config, stage, placeholders, tracking_uri=None, parent_run_id=None)
    try:
        return KINDS[stage.kind].model().model_validate(data)
    except ValidationError as e:
        where = f"stage {stage.name!r} ({KINDS[stage.kind].job}): params."
        raise ConfigError([where + line for line in describe_errors(e)]) from None
