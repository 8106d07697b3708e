"""Per-rank randomness and exact resume, through the real stage (pipelines.train.stage.run_training_stage) on a local Ray
cluster: tiny model, 32 px latents, CPU workers (gloo), tracking to a sqlite file (integration)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch
from mlflow import MlflowClient

from pipelines.train.config import TrainStageConfig
from pipelines.data.latent_store import OUTPUT_SCHEMA, LatentWriter
from hdm_model.checkpoint import TRAINING_STATE

from tests.tiny_models import make_tiny_text_encoder, make_tiny_vae
from tests.pipelines.latent_fixtures import make_latent_dataset

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"te": str(make_tiny_text_encoder(root / "te")), "vae": str(make_tiny_vae(root / "vae"))}


@pytest.fixture
def ordered_reads(ray_driver):
    """Ray Data reads and splits in a fixed order (datasets created meanwhile keep it)."""
    import ray

    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    yield
    options.preserve_order = before


def _config(work: Path, models: dict, *, name: str, workers: int, steps: int, **overrides) -> TrainStageConfig:
    return TrainStageConfig(res=32, latents=str(work / "latents"), storage=str(work / "runs"), name=name, model="tiny",
                       text_encoder=models["te"], init_from="none", steps=steps, batch_size=2, grad_accum=1,
                       ctx_length=8, checkpoint_every=1000, log_every=1, workers=workers, torch_threads=1,
                       sample={"every": 10_000, "steps": 1, "seeds": [0]},
                       tracking={"uri": f"sqlite:///{work}/mlflow.db", "experiment": "ranks"}, **overrides)


def _history(config: TrainStageConfig, run_id: str, metric: str) -> dict[int, float]:
    client = MlflowClient(config.tracking.uri)
    return {m.step: m.value for m in client.get_metric_history(run_id, metric)}


def _trained_keys(checkpoint: str) -> list[str]:
    return torch.load(Path(checkpoint) / TRAINING_STATE, weights_only=True)["epoch_keys"]


def _identical_latents(root: Path, n: int, *, vae: str) -> None:
    """n rows of res=32 that differ only in their key: one square latent (no crop shift), no posterior std."""
    make_latent_dataset(str(root), [32], n, vae=vae)  # the manifest and layout; its rows are replaced
    for part in (root / "res=32").glob("*.parquet"):
        part.unlink()
    z = np.random.default_rng(1).normal(size=(4, 4, 4)).astype(np.float16)
    rows = [{"kind": "latent", "res": 32, "key": f"same{i:03d}", "sha256": "", "source": "synthetic",
             "caption": "a red square on white", "caption_source": "input", "width": 32, "height": 32,
             "resized_width": 32, "resized_height": 32, "aspect": 1.0, "latent": z.tobytes(),
             "latent_shape": [4, 4, 4], "latent_std": None} for i in range(n)]
    LatentWriter(pafs.LocalFileSystem(), str(root)).write(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA))


def test_ranks_draw_their_own_timesteps_and_noise(ray_driver, models, tmp_path):
    """Every row holds the same latent and caption and nothing is drawn per sample (square, no std, no
    dropout), so rank 1's batch equals rank 0's. Step 1 with one worker and with two: rank 0 logs the same
    loss in both runs (the same data and draws: seeded by rank 0, step 1), but the logged gradient norm,
    that of DDP's mean over the ranks, differs only if rank 1 drew other timesteps, noise or TREAD mask
    (with one seed on every rank, its gradient would equal rank 0's and the mean would be rank 0's)."""
    from pipelines.train.stage import run_training_stage

    _identical_latents(tmp_path / "latents", 8, vae=models["vae"])
    runs = {}
    for workers in (1, 2):
        config = _config(tmp_path, models, name=f"w{workers}", workers=workers, steps=1, caption_dropout=0.0)
        summary = run_training_stage(config)
        runs[workers] = {m: _history(config, summary.run_id, m)[1] for m in ("loss", "grad_norm")}
    print(runs)
    assert runs[1]["loss"] == pytest.approx(runs[2]["loss"], abs=1e-6)
    assert abs(runs[1]["grad_norm"] - runs[2]["grad_norm"]) > 1e-3 * runs[1]["grad_norm"]


def test_a_resumed_run_logs_the_uninterrupted_runs_losses(ordered_reads, models, tmp_path):
    """Two workers, 16 latents, batches of 2: 4 steps an epoch. The run of 6 steps against one of 2 steps
    relaunched (same name) with 6: it resumes from its step-2 checkpoint, in the middle of epoch 0, and must
    log the same loss at every step (1e-6). The first launch's schedule has 2 steps in all, but both are in
    the warm-up, whose lr does not depend on the total (asserted below), so the weights at step 2 agree."""
    from pipelines.train.stage import run_training_stage

    make_latent_dataset(str(tmp_path / "latents"), [32], 16, vae=models["vae"])
    whole = _config(tmp_path, models, name="whole", workers=2, steps=6, warmup_steps=2)
    expected = run_training_stage(whole)
    first = run_training_stage(_config(tmp_path, models, name="split", workers=2, steps=2, warmup_steps=2))
    resumed = run_training_stage(_config(tmp_path, models, name="split", workers=2, steps=6, warmup_steps=2))
    assert resumed.run_id == first.run_id
    tags = MlflowClient(whole.tracking.uri).get_run(resumed.run_id).data.tags
    assert tags["hdm.resumed_at_step"] == "2"
    want, got = (_history(whole, run.run_id, "loss") for run in (expected, resumed))
    print({step: (want[step], got[step]) for step in want})
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    assert _history(whole, resumed.run_id, "lr")[2] == _history(whole, expected.run_id, "lr")[2] > 0
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step


def test_an_epoch_resumed_with_fewer_workers_trains_each_key_once(ray_driver, models, tmp_path):
    """16 latents, batches of 2: two workers train 8 keys in 2 steps (4 batches) and checkpoint; the relaunch
    with ONE worker reads all 16 in another order, leaves out the 8 the checkpoint lists and trains the other
    8 in steps 3-6 (no row is left over for drop_last). The checkpoint at step 6, still in epoch 0, lists
    every key trained in the epoch, once per training: every key must be there exactly once."""
    from pipelines.train.stage import run_training_stage

    make_latent_dataset(str(tmp_path / "latents"), [32], 16, vae=models["vae"])
    keys = [f"img{i:04d}" for i in range(16)]
    first = run_training_stage(_config(tmp_path, models, name="shrink", workers=2, steps=2))
    half = _trained_keys(first.checkpoint)
    assert len(half) == len(set(half)) == 8 and set(half) < set(keys)
    second = run_training_stage(_config(tmp_path, models, name="shrink", workers=1, steps=6))
    state = torch.load(Path(second.checkpoint) / TRAINING_STATE, weights_only=True)
    assert (state["step"], state["epoch"]) == (6, 0)
    assert state["epoch_keys"] == keys  # sorted, and a key trained twice would be listed twice
