"""The Ray Train glue both training jobs share (the denoiser stage and the EQ-VAE job).

Driver side: `quiet_progress_bars` before the job's datasets, then `fit`, which hands the workers the job's
MLflow run and marks that run FAILED when training raises (KILLED when the job is stopped). Worker side:
`WorkerContext.start` (rank, world, device, torch threads), its model, dataset shard and resumed checkpoint,
`tracking_run` (the driver's run on rank 0, buffered; a disabled one elsewhere), `seed_init` and `report`
(metrics from every rank, a checkpoint written by rank 0). The jobs' worker code reaches Ray Train only through here.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from pipelines.cluster import set_train_threads
from pipelines.tracking import StageRun

_RUN_ID, _TRACKING_URI, _STARTED_MS = "run_id", "tracking_uri", "started_ms"  # what `fit` adds to the loop config


# ---------------------------------------------------------------------------------------------------
# Driver side

def quiet_progress_bars() -> None:
    """Ray Data's progress bars off, before any dataset is made: the workers' log lines say more."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False


def fit(train_loop: Callable[[dict], None], *, run: StageRun, tracking_uri: str, loop_config: Mapping[str, Any],
        **trainer_options: Any):
    """`TorchTrainer(train_loop, ...).fit()`'s result; the workers get `loop_config` plus the run to log to.
    `run` is marked FAILED when training raises, KILLED when the job is stopped (and the error raised)."""
    from ray.train.torch import TorchTrainer

    started_ms = int(time.time() * 1000)  # what this job logs is stamped from now on (tracking_run)
    trainer = TorchTrainer(train_loop, train_loop_config={**loop_config, _RUN_ID: run.run_id,
                                                          _TRACKING_URI: tracking_uri, _STARTED_MS: started_ms},
                           **trainer_options)
    with run.ending_on_error():  # FAILED, or KILLED on SIGTERM (pipelines.tracking.raise_on_sigterm)
        return trainer.fit()


# ---------------------------------------------------------------------------------------------------
# Worker side

def seed_init(seed: int) -> None:
    """Seed torch's global RNG for the model's init: the same weights on every rank (DDP broadcasts rank 0's
    anyway). Training draws come from their own generators, never from this one."""
    torch.manual_seed(seed)


@dataclass(frozen=True)
class WorkerContext:
    """Where this Ray Train worker stands: its rank among `world` workers, `local_world` of them on its node."""

    rank: int
    world: int
    local_world: int
    device: torch.device

    @classmethod
    def start(cls, *, torch_threads: int | None) -> WorkerContext:
        """This worker's context, its torch threads set (CPU workers: `set_train_threads`)."""
        import ray.train
        import ray.train.torch

        train_context = ray.train.get_context()
        worker = cls(rank=train_context.get_world_rank(), world=train_context.get_world_size(),
                     local_world=train_context.get_local_world_size(), device=ray.train.torch.get_device())
        set_train_threads(worker.device, worker.local_world, torch_threads)
        return worker

    @property
    def is_chief(self) -> bool:
        """Rank 0: the worker that logs, samples and writes checkpoints."""
        return self.rank == 0

    def prepare_model(self, model: torch.nn.Module, *, ddp: Mapping[str, Any] | None = None) -> torch.nn.Module:
        """The model on this worker's device, wrapped in DDP (with the options `ddp`) when there are several
        workers."""
        import ray.train.torch

        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs=dict(ddp or {}))

    def dataset_shard(self, name: str = "train"):
        """This worker's shard of the dataset the driver passed as `name`."""
        import ray.train

        return ray.train.get_dataset_shard(name)

    @contextmanager
    def resumed_checkpoint(self) -> Iterator[Path | None]:
        """The local directory of the checkpoint Ray Train restarts this run from (a relaunch or a worker
        failure), None on a fresh start."""
        import ray.train

        resume = ray.train.get_checkpoint()
        if resume is None:
            yield None
            return
        with resume.as_directory() as directory:
            yield Path(directory)

    def tracking_run(self, loop_config: Mapping[str, Any], *, resume_metric: str | None = None,
                     resumed: bool = False) -> StageRun:
        """The job's run (from `fit`) on rank 0, buffered and never raising into training (StageRun's worker
        mode); a disabled run, where every call is a no-op, elsewhere. `resume_metric`: steps of this metric
        already logged are not logged again: any step when `resumed` from a checkpoint (a relaunch or a rerun),
        else only those this job logged (a relaunch before the first checkpoint; a rerun from scratch that
        reopened the run appends anew)."""
        if not self.is_chief:
            return StageRun(None, None)
        return StageRun.attach(tracking_uri=loop_config[_TRACKING_URI], run_id=loop_config[_RUN_ID], worker=True,
                               resume_metric=resume_metric,
                               logged_since_ms=None if resumed else loop_config.get(_STARTED_MS))

    def report(self, metrics: Mapping[str, Any], *, write: Callable[[Path], None] | None = None) -> None:
        """`ray.train.report(metrics)` on every rank (a collective), with the checkpoint that rank 0's
        `write(directory)` fills, when given."""
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if write is not None and self.is_chief:
                write(Path(tmp))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(dict(metrics), checkpoint=checkpoint)


class BackgroundCheckpoints:
    """Checkpoints written and uploaded by a thread while training goes on, reported to Ray Train once complete.

    `start` (every rank, at a checkpoint step): rank 0's `write(directory)`, which must hold its own copy of the
    state, runs on a thread that then uploads the directory into the run's storage, `commit_file` (the file
    whose presence makes a directory read as a checkpoint) last. `finish` (every rank, at a later step they all
    agree on: a collective): rank 0 waits for that thread, rarely long, and raises what it raised; then every
    rank reports, rank 0 with the uploaded checkpoint. As durable as a checkpoint reported in line: Ray Train
    registers it (and a relaunch resumes from it) only at that report, after the upload completed, and no crash
    leaves in storage a directory that loads as a checkpoint but misses a file.
    """

    def __init__(self, worker: WorkerContext):
        self.worker = worker
        self.pending: dict[str, Any] | None = None  # metrics, and on rank 0 the thread and its outcome

    def start(self, metrics: Mapping[str, Any], *, write: Callable[[Path], None] | None, commit_file: str,
              name: str) -> None:
        """Begin checkpoint `name` (a directory name, unique in the run); finish the previous one first."""
        if self.pending is not None:
            self.finish()
        self.pending = {"metrics": dict(metrics)}
        if self.worker.is_chief and write is not None:
            outcome: dict[str, Any] = {}
            thread = threading.Thread(target=_write_and_upload, name="checkpoint-upload", daemon=True,
                                      args=(write, commit_file, name, outcome))
            thread.start()
            self.pending.update(thread=thread, outcome=outcome)

    def finish(self) -> None:
        """Report the pending checkpoint (every rank calls this at the same step)."""
        import ray.train
        from ray.train import CheckpointUploadMode

        pending, self.pending = self.pending, None
        if pending is None:
            return
        persisted = None
        if "thread" in pending:
            pending["thread"].join()
            if "error" in pending["outcome"]:
                raise pending["outcome"]["error"]
            persisted = pending["outcome"]["checkpoint"]
        ray.train.report(pending["metrics"], checkpoint=persisted,
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def _write_and_upload(write: Callable[[Path], None], commit_file: str, name: str, outcome: dict) -> None:
    """The checkpoint thread: write into a local directory, copy it into the run's storage (`commit_file`
    last), delete the local copy; the persisted checkpoint, or the error, into `outcome`."""
    import shutil

    import ray.train

    directory = Path(tempfile.mkdtemp(prefix="hdm-checkpoint-"))
    try:
        write(directory)
        held = (directory / commit_file).read_bytes()
        (directory / commit_file).unlink()
        persisted = ray.train.get_context().get_storage().persist_current_checkpoint(
            ray.train.Checkpoint.from_directory(str(directory)), name)
        with persisted.filesystem.open_output_stream(f"{persisted.path}/{commit_file}") as out:
            out.write(held)
        outcome["checkpoint"] = persisted
    except BaseException as error:  # raised by `finish`, on the training thread
        outcome["error"] = error
    finally:
        shutil.rmtree(directory, ignore_errors=True)
