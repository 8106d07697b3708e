"""The Ray Train glue of both training jobs (pipelines/train/harness.py), without a cluster: which rank logs,
what a report carries, and a failed fit marking the job's run FAILED."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from pipelines.tracking import StageRun
from pipelines.train.harness import WorkerContext, fit


def _worker(rank: int) -> WorkerContext:
    return WorkerContext(rank=rank, world=2, local_world=2, device=torch.device("cpu"))


@pytest.fixture()
def run(tmp_path) -> StageRun:
    return StageRun.open(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="harness", stage_key="k",
                         run_name="train-32")


class _FailingTrainer:
    """Stands in for TorchTrainer: records what it was given, then fails as a worker error would."""

    given: dict = {}

    def __init__(self, train_loop, *, train_loop_config, **options):
        type(self).given = {"loop": train_loop, "config": train_loop_config, **options}

    def fit(self):
        raise RuntimeError("worker died")


def test_a_failed_fit_marks_the_run_failed_and_raises(run, monkeypatch, tmp_path):
    import ray.train.torch

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", _FailingTrainer)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(RuntimeError, match="worker died"):
        fit(print, run=run, tracking_uri=uri, loop_config={"config": {"res": 32}}, scaling_config="scaling")
    assert MlflowClient(uri).get_run(run.run_id).info.status == "FAILED"
    given = _FailingTrainer.given
    assert given["loop"] is print and given["scaling_config"] == "scaling"
    # the workers get the job's loop config and the run to attach to (WorkerContext.tracking_run)
    started = given["config"].pop("started_ms")  # what this job logs is stamped after it (a relaunch's skip)
    assert abs(started / 1000 - time.time()) < 60
    assert given["config"] == {"config": {"res": 32}, "run_id": run.run_id, "tracking_uri": uri}
    chief = _worker(0).tracking_run({**given["config"], "started_ms": started})
    assert chief.run_id == run.run_id and chief.worker and chief.logged_since_ms == started
    resumed = _worker(0).tracking_run({**given["config"], "started_ms": started}, resume_metric="loss", resumed=True)
    assert resumed.resume_metric == "loss" and resumed.logged_since_ms is None  # a checkpoint: any logged step
    assert not _worker(1).tracking_run(given["config"]).enabled  # only rank 0 logs


def test_every_rank_reports_and_rank_0_writes_the_checkpoint(monkeypatch):
    import ray.train

    reports = []

    def report(metrics, *, checkpoint=None):
        files = sorted(p.name for p in Path(checkpoint.path).iterdir()) if checkpoint else None
        reports.append((metrics, files))

    monkeypatch.setattr(ray.train, "report", report)
    written = []
    for rank in (0, 1):
        _worker(rank).report({"step": 6}, write=lambda d: written.append((d / "state.txt").write_text("x")))
    _worker(0).report({"step": 7})
    assert reports == [({"step": 6}, ["state.txt"]), ({"step": 6}, None), ({"step": 7}, None)]
    assert len(written) == 1


class _Storage:
    """Ray Train's storage context as the upload thread uses it: copies a checkpoint directory into `root`,
    file by file, optionally dying after `die_after` files (the fault: a node lost mid-upload)."""

    def __init__(self, root: Path, die_after: int | None = None):
        self.root, self.die_after = root, die_after

    def persist_current_checkpoint(self, checkpoint, name: str):
        import shutil

        import pyarrow.fs as pafs
        import ray.train

        target = self.root / name
        target.mkdir(parents=True)
        for i, path in enumerate(sorted(Path(checkpoint.path).iterdir())):
            if self.die_after is not None and i == self.die_after:
                raise ConnectionError("node lost during the upload")
            shutil.copy(path, target / path.name)
        return ray.train.Checkpoint(str(target), filesystem=pafs.LocalFileSystem())


def _background_checkpoint(monkeypatch, storage: _Storage, rank: int, write):
    """A BackgroundCheckpoints round on `rank` (start, then finish); what ray.train.report got."""
    import ray.train

    from pipelines.train.harness import BackgroundCheckpoints

    got = {}

    def report(metrics, *, checkpoint=None, checkpoint_upload_mode=None):
        got.update(metrics=metrics, mode=checkpoint_upload_mode.name, checkpoint=checkpoint)

    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train, "get_context", lambda: type("Ctx", (), {"get_storage": lambda self: storage})())
    checkpoints = BackgroundCheckpoints(_worker(rank))
    checkpoints.start({"step": 6}, write=write, commit_file="config.json", name="checkpoint_000006")
    assert checkpoints.pending is not None and got == {}  # nothing reported before `finish`
    checkpoints.finish()
    assert checkpoints.pending is None
    return got


def _write_three_files(directory: Path) -> None:
    for name in ("config.json", "model.safetensors", "training_state.pt"):
        (directory / name).write_text(name)


def test_a_background_checkpoint_is_reported_once_uploaded_with_the_commit_file_last(monkeypatch, tmp_path):
    got = _background_checkpoint(monkeypatch, _Storage(tmp_path), 0, _write_three_files)
    assert (got["metrics"], got["mode"]) == ({"step": 6}, "NO_UPLOAD")  # Ray Train only registers it
    stored = Path(got["checkpoint"].path)
    assert sorted(p.name for p in stored.iterdir()) == ["config.json", "model.safetensors", "training_state.pt"]
    assert (stored / "config.json").read_text() == "config.json"
    other = _background_checkpoint(monkeypatch, _Storage(tmp_path / "r1"), 1, None)  # rank 1: metrics only
    assert (other["mode"], other["checkpoint"]) == ("NO_UPLOAD", None)


def test_an_upload_that_dies_is_never_reported_and_leaves_no_commit_file(monkeypatch, tmp_path):
    """The fault injected: the upload stops after one file. `finish` raises it on the training thread before
    any report, so Ray Train registers nothing; storage holds no config.json, so the partial directory never
    reads as a checkpoint (hdm_model.checkpoint.is_checkpoint)."""
    with pytest.raises(ConnectionError):
        _background_checkpoint(monkeypatch, _Storage(tmp_path, die_after=1), 0, _write_three_files)
    assert sorted(p.name for p in (tmp_path / "checkpoint_000006").iterdir()) == ["model.safetensors"]
