"""The Ray Train glue of both training jobs (pipelines/train/harness.py), without a cluster: which rank logs,
what a report carries, and a failed fit marking the job's run FAILED."""

from __future__ import annotations

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
    assert given["config"] == {"config": {"res": 32}, "run_id": run.run_id, "tracking_uri": uri}
    assert _worker(0).tracking_run(given["config"]).run_id == run.run_id
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
