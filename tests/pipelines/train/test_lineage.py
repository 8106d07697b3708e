"""Where a training stage's starting weights come from (`--init-from`), against a real MLflow store.

The previous stages' runs are real MLflow runs (sqlite store) carrying the tags a training stage writes; the
lookups under test read exactly those tags. No Ray: the lineage is resolved before any worker starts.
"""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from pipelines.train.config import TrainStageConfig
from pipelines.data.latent_store import read_manifest, write_manifest
from pipelines.train.lineage import find_previous_stage, resolve_init
from pipelines.train.stage import run_training_stage
from pipelines.storage import resolve
from pipelines.tracking import (CHECKPOINT_TAG, INIT_FROM_TAG, INIT_REQUEST_TAG, MODEL_TAG, PARENT_TAG, PREV_RUN_TAG,
                                RES_TAG, TEXT_ENCODER_TAG, StageRun)

from tests.pipelines.latent_fixtures import make_latent_dataset

EXPERIMENT = "lineage"


@pytest.fixture()
def uri(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


def _config(res: int, uri: str, **fields) -> TrainStageConfig:
    tracking = {"uri": uri, "experiment": EXPERIMENT, **fields.pop("tracking", {})}
    return TrainStageConfig(res=res, latents="/unused", storage="/unused", model=fields.pop("model", "tiny"),
                       text_encoder=fields.pop("text_encoder", "te-a"), tracking=tracking, **fields)


def _training_run(uri: str, res: int, *, status: str = "FINISHED", model: str = "tiny", text_encoder: str = "te-a",
                  parent: str | None = None, checkpoint: bool = True) -> tuple[str, str]:
    """A training stage's run as run_training_stage leaves it: (run id, its checkpoint URI)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
    tags = {"hdm.stage": "train", RES_TAG: str(res), MODEL_TAG: model, TEXT_ENCODER_TAG: text_encoder}
    if parent:
        tags[PARENT_TAG] = parent
    run = client.create_run(exp_id, tags=tags, run_name=f"train-{res}")
    ckpt = f"/ckpt/{run.info.run_id}/checkpoint_000001"
    if checkpoint:
        client.set_tag(run.info.run_id, CHECKPOINT_TAG, ckpt)
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status=status)
    return run.info.run_id, ckpt


def test_auto_takes_the_latest_run_of_the_previous_resolution(uri):
    _training_run(uri, 256)
    old_512, _ = _training_run(uri, 512)
    new_512, ckpt = _training_run(uri, 512)
    assert find_previous_stage(uri, _config(768, uri)) == (new_512, ckpt)
    assert old_512 != new_512


def test_auto_refuses_a_failed_or_unfinished_previous_stage_instead_of_falling_back(uri):
    _training_run(uri, 256)  # finished, but not the previous resolution of 768 once a 512 run exists
    failed, _ = _training_run(uri, 512, status="FAILED")
    with pytest.raises(LookupError, match=rf"latest 512 px training run 'train-512' \({failed}.*is FAILED"):
        find_previous_stage(uri, _config(768, uri))
    running, _ = _training_run(uri, 512, status="RUNNING")
    with pytest.raises(LookupError, match=rf"\({running}, 512 px\).* is RUNNING"):
        find_previous_stage(uri, _config(768, uri))
    no_ckpt, _ = _training_run(uri, 512, checkpoint=False)
    with pytest.raises(LookupError, match=rf"\({no_ckpt}, 512 px\).*without a checkpoint"):
        find_previous_stage(uri, _config(768, uri))


def test_auto_stays_in_its_lineage(uri):
    mine, ckpt = _training_run(uri, 256)
    _training_run(uri, 256, model="xut-base")  # newer runs of other models / text encoders do not count
    _training_run(uri, 256, text_encoder="te-b")
    assert find_previous_stage(uri, _config(512, uri)) == (mine, ckpt)
    with pytest.raises(LookupError, match="found no finished training run below 512 px.*model 'xut-small'"):
        find_previous_stage(uri, _config(512, uri, model="xut-small"))
    # Under a DAG, only the children of the same pipeline run: not a newer run of the same model elsewhere.
    in_dag, dag_ckpt = _training_run(uri, 256, parent="pipeline-1")
    _training_run(uri, 256)
    _training_run(uri, 256, parent="pipeline-2")
    assert find_previous_stage(uri, _config(512, uri, tracking={"parent_run_id": "pipeline-1"})) == (in_dag, dag_ckpt)


def test_auto_is_resolved_once_and_a_relaunch_reuses_it(uri):
    first, ckpt = _training_run(uri, 256)
    cfg = _config(512, uri)
    prev_run, init = resolve_init(uri, cfg, "/train-512")
    assert (prev_run, init) == (first, ckpt)
    # The first launch records what it resolved on its run (as run_training_stage does), then fails.
    run = StageRun.open(tracking_uri=uri, experiment=EXPERIMENT, stage_key="/train-512", run_name="train-512",
                        tags={"hdm.stage": "train", RES_TAG: 512, MODEL_TAG: "tiny", TEXT_ENCODER_TAG: "te-a",
                              INIT_REQUEST_TAG: "auto", INIT_FROM_TAG: init, PREV_RUN_TAG: prev_run})
    run.finish("FAILED")
    _training_run(uri, 256)  # a later 256 px run finishes before the relaunch
    assert resolve_init(uri, cfg, "/train-512") == (first, ckpt)
    assert resolve_init(uri, cfg, "/another-stage")[0] != first  # a new stage resolves afresh


def test_an_explicit_checkpoint_names_the_run_that_made_it(uri):
    """The DAG wires the previous stage's checkpoint URI as --init-from: prev_run must still name that run."""
    prev, ckpt = _training_run(uri, 256, parent="pipeline-1")
    _training_run(uri, 256, parent="pipeline-1")
    assert resolve_init(uri, _config(512, uri, init_from=ckpt), "p/train-512") == (prev, ckpt)
    assert resolve_init(uri, _config(512, uri, init_from="/elsewhere/ckpt"), "p/train-512") == (None, "/elsewhere/ckpt")
    assert resolve_init(uri, _config(512, uri, init_from="none"), "p/train-512") == (None, None)


def test_training_refuses_an_incomplete_latent_set(uri, tmp_path):
    root = str(tmp_path / "latents")
    make_latent_dataset(root, [32], 4, vae="unused")
    fs, path = resolve(root)
    manifest = read_manifest(fs, path)
    write_manifest(fs, path, {**manifest, "status": "running"})  # what precompute writes before its first row
    cfg = TrainStageConfig(res=32, latents=root, storage=str(tmp_path / "runs"), model="tiny", init_from="none",
                      tracking={"uri": uri, "experiment": EXPERIMENT})
    with pytest.raises(ValueError, match=rf"latent set {root} is not complete \(manifest status 'running'\)"):
        run_training_stage(cfg)
    assert MlflowClient(uri).get_experiment_by_name(EXPERIMENT) is None  # refused before any run was opened
    assert json.loads((tmp_path / "latents" / "manifest.json").read_text())["status"] == "running"  # untouched
