"""The Ray Train worker of a progressive-resolution training stage (the driver is pipelines/train/stage.py).

Each worker reads its shard of LATENTS/res=R through Ray Data (equal shards, drop_last). Per micro-batch,
prepared ahead by a background thread, a fresh shifted square crop of each stored latent in latent space
(posterior resampled when its std is stored); captions encoded online by the frozen text encoder (some replaced
by the null prompt), the flow-matching loss with TREAD; muP AdamW, warm-up + cosine, accumulation, clipping,
optional EMA; checkpoints every K steps through `ray.train.report`, resumed on relaunch or worker failure.
A checkpoint records the latent keys trained in its epoch, so a resume trains each of the others once
(whatever the read order or worker count), and every draw is seeded (pipelines/train/batches.py).

Parts: batches.py (what is trained on), step.py (the training step), meter.py (what is logged),
harness.py (the Ray Train glue); here the checkpoint contents and the loop that ties them together.
"""

from __future__ import annotations

import hashlib
import uuid
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from hdm_model import checkpoint

from pipelines import faults, progress
from pipelines.config import S3Options
from pipelines.secrets import redact
from pipelines.storage import local_path, node_copy
from pipelines.tracking import FINAL_WEIGHTS_TAG, INIT_WEIGHTS_TAG, RESUMED_AT_TAG, StageRun
from pipelines.train.batches import (END_OF_EPOCH, BatchPrefetcher, EpochKeys, LatentBatcher, MicroBatch,
                                     ResumedEpoch, blank_batch)
from pipelines.train.config import TrainStageConfig
from pipelines.train.harness import BackgroundCheckpoints, WorkerContext, seed_init
from pipelines.train.meter import Meter
from pipelines.train.step import EMA, TrainStep, build_model, unwrap

FAILED_FLUSH_S = 30.0  # how long a worker whose training raised waits for its metrics to reach MLflow
CHECKPOINT_FLUSH_S = 5.0  # ... and, before reporting a checkpoint, for the steps logged before it


# ---------------------------------------------------------------------------------------------------
# A stage's checkpoint: weights, EMA and training state in hdm_model.checkpoint's format

def checkpoint_meta(cfg: TrainStageConfig, model_config, vae: str) -> checkpoint.CheckpointMeta:
    return checkpoint.CheckpointMeta(model=model_config, text_encoder=cfg.text_encoder, max_length=cfg.ctx_length,
                                     vae=vae, stage=redact(cfg.model_dump(mode="json")))  # shared: no credentials


def checkpoint_writer(*, model, cfg: TrainStageConfig, vae: str, optimizer, scheduler, ema: EMA | None,
                      progress: dict[str, int], epoch_keys: list[str]) -> Callable[[Path], None]:
    """`write(directory)` of the checkpoint of the state as it is NOW: weights, EMA, optimizer and schedule are
    copied to host memory here (the only part that holds up training), so the writing can run while the next
    steps change them. `progress`: step and epoch; `epoch_keys`: the latent keys every rank trained in that
    epoch (EpochKeys). No RNG state: training draws from generators seeded by step and key, not from torch's
    global RNG."""
    net = unwrap(model)
    state = _to_host({"weights": net.state_dict(), "ema": ema.shadow if ema is not None else None,
                      "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
    meta = checkpoint_meta(cfg, net.config, vae)
    training_state = {"optimizer": state["optimizer"], "scheduler": state["scheduler"], **progress,
                      "epoch_keys": list(epoch_keys)}
    return lambda directory: checkpoint.save(directory, weights=state["weights"], meta=meta, ema=state["ema"],
                                             training_state=training_state)


def save_checkpoint(directory: Path, **state) -> None:
    """Write the checkpoint of the state now (checkpoint_writer's arguments) into `directory`."""
    checkpoint_writer(**state)(directory)


def _to_host(value: Any) -> Any:
    """`value` with every tensor in it copied to host memory (dicts, lists and tuples walked)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_host(v) for v in value)
    return value


def restore_checkpoint(directory: Path, net, optimizer, scheduler,
                       ema: EMA | None) -> tuple[dict[str, int], frozenset[str]]:
    """(progress, keys trained in its epoch) of a checkpoint, its weights, optimizer, schedule and EMA loaded."""
    net.load_state_dict(checkpoint.load_weights(directory, device=next(net.parameters()).device))
    state = checkpoint.load_training_state(directory)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None and checkpoint.has_ema(directory):
        ema.load(directory)
    elif ema is not None:  # EMA turned on at this relaunch: it starts from the restored weights
        ema.reset(net)
    progress = {k: int(state[k]) for k in ("step", "epoch")}
    if "epoch_keys" not in state:  # written before resume by keys: a batch count, which no other order replays
        print(f"checkpoint at step {progress['step']} records no trained keys (older format): epoch "
              f"{progress['epoch']} restarts from its beginning", flush=True)
    return progress, frozenset(state.get("epoch_keys", ()))


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the weights (sorted names, float32 bytes): lineage checks across stages."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_weights(model: torch.nn.Module, directory: str) -> None:
    """Starting weights: a checkpoint directory of ours (model.safetensors, our names), else the original's
    release (its single .safetensors file or its diffusers folder, fp16 as released; a pickle is refused)."""
    from hdm_model.official import denoiser_state_from_release

    path, net = Path(directory), unwrap(model)
    if checkpoint.is_checkpoint(path):
        state = checkpoint.load_weights(path)
    else:
        state = denoiser_state_from_release(path, net.config)  # names and shapes checked against the model
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"weights in {directory} do not fit this model: missing {sorted(missing)[:10]}, "
                       f"unexpected {sorted(unexpected)[:10]}")


# ---------------------------------------------------------------------------------------------------
# The loop

def encode_batch(text_encoder, batch: MicroBatch) -> torch.Tensor:
    """The text states of a micro-batch: from the tokens the prefetch thread made, else (a blank batch) from
    its captions."""
    if batch.tokens is not None:
        return text_encoder.encode_tokens(batch.tokens)
    return text_encoder(batch.captions, padding="max_length")


def train_loop(loop_config: dict) -> None:
    """One Ray Train worker of a training stage: set up (resumed from Ray Train's checkpoint when there is one),
    then train."""
    cfg = TrainStageConfig.model_validate(loop_config["config"])
    loop = StageLoop.setup(cfg, WorkerContext.start(torch_threads=cfg.torch_threads), loop_config)
    finished = False
    try:
        loop.train()
        finished = True
    finally:  # what the run did not take yet: waited for (an outage), briefly when training failed
        loop.run.close(timeout_s=None if finished else FAILED_FLUSH_S)


class StageLoop:
    """A training stage on one worker: the step, where the run stands (step, epoch, keys trained in the
    epoch) and what it logs."""

    def __init__(self, cfg: TrainStageConfig, worker: WorkerContext, *, step: TrainStep, text_encoder,
                 run: StageRun, vae: str):
        self.cfg, self.worker, self.step, self.run = cfg, worker, step, run
        self.text_encoder, self.vae = text_encoder, vae  # for the sample grids
        self.epoch, self.done_keys = 0, frozenset()  # a resume sets both
        self.meter = Meter()
        self.checkpoints = BackgroundCheckpoints(worker)

    @classmethod
    def setup(cls, cfg: TrainStageConfig, worker: WorkerContext, loop_config: dict) -> StageLoop:
        """Text encoder, model (from `init_from` on a fresh start), step; resumed from Ray Train's checkpoint."""
        from hdm_model import TextEncoder

        from hdm_model.compile import compile_text_encoder, resolve_compile

        gpu = worker.device.type == "cuda"
        text_encoder = TextEncoder.from_pretrained(cfg.text_encoder, max_length=cfg.ctx_length, device=worker.device,
                                                   dtype=torch.bfloat16 if gpu else None, cache_size=cfg.text_cache_size,
                                                   attn_implementation=cfg.text_attn)
        compile_text_encoder(text_encoder, resolve_compile(cfg.compile, worker.device))
        seed_init(cfg.seed)  # the model's init only, the same on every rank; no training draw uses it
        model = build_model(cfg, ctx_dim=text_encoder.hidden_size, device=worker.device)
        with worker.resumed_checkpoint() as resume:
            return cls._start(cfg, worker, loop_config, text_encoder=text_encoder, model=model, resume=resume)

    @classmethod
    def _start(cls, cfg: TrainStageConfig, worker: WorkerContext, loop_config: dict, *, text_encoder, model,
               resume: Path | None) -> StageLoop:
        """The loop from `init_from`'s weights on a fresh start, else from the checkpoint `resume`."""
        init = loop_config["init_from"]
        if resume is None and init:
            with local_path(init, S3Options.model_validate(loop_config["s3"])) as path:
                load_weights(model, path)
        step = TrainStep.for_stage(cfg, worker.prepare_model(model, ddp=cfg.ddp.model_dump()),
                                   encode_text=partial(encode_batch, text_encoder), device=worker.device,
                                   rank=worker.rank, world=worker.world)
        loop = cls(cfg, worker, step=step, text_encoder=text_encoder, vae=loop_config["vae"],
                   run=worker.tracking_run(loop_config, resume_metric="loss", resumed=resume is not None))
        if resume is not None:
            loop.resume(resume)
        elif init and loop.run.enabled:
            loop.run.set_tags({INIT_WEIGHTS_TAG: weights_digest(step.net)})
        return loop

    def resume(self, directory: Path) -> None:
        """Weights, optimizer, schedule, EMA, step, epoch and the keys trained in it, from a checkpoint."""
        step = self.step
        progress, self.done_keys = restore_checkpoint(directory, step.net, step.optimizer, step.scheduler, step.ema)
        step.step, self.epoch = progress["step"], progress["epoch"]
        self.run.set_tags({RESUMED_AT_TAG: step.step})

    def train(self) -> None:
        """Optimizer step after optimizer step until `cfg.steps`, each logged, sampled and checkpointed when due."""
        self.data = self.open_data()
        try:
            while self.step.step < self.cfg.steps:
                batch, weight = self.next_batch()
                if batch is not END_OF_EPOCH and self.micro_step(batch, weight):
                    self.optimizer_step()
                    faults.inject("train.kill", [f"step{self.step.step}"])  # the chaos suite's dying worker
                    self.maybe_log()
                    self.maybe_sample()
                    self.maybe_checkpoint()
        finally:
            self.data.close()

    def open_data(self) -> BatchPrefetcher:
        """This worker's shard, from the run's epoch on: a resumed run starts without the keys trained in it
        (in step across ranks with `ResumedEpoch`, as they may then hold uneven batch counts)."""
        cfg, world = self.cfg, self.worker.world
        self.epoch_keys = EpochKeys(self.done_keys)
        self.resumed_epoch = ResumedEpoch(world=world, device=self.worker.device, blank=blank_batch(
            channels=self.step.net.config.in_channels, side=cfg.res // 8)) if self.done_keys and world > 1 else None
        batcher = LatentBatcher(caption_dropout=cfg.caption_dropout, seed=cfg.seed, pin=self.worker.device.type == "cuda",
                                tokenize=partial(self.text_encoder.tokenize, padding="max_length"))
        return BatchPrefetcher(self.worker.dataset_shard("train"), batcher, batch_size=cfg.batch_size,
                               epoch=self.epoch, done_keys=self.done_keys, shuffle_buffer=cfg.shuffle_buffer,
                               seed=cfg.seed)

    def next_batch(self) -> tuple[Any, float]:
        """(MicroBatch or END_OF_EPOCH, loss weight). Data wait: the loop blocked on the next batch."""
        with self.meter.waiting():
            item, weight = self.resumed_epoch.next(self.data) if self.resumed_epoch is not None \
                else (self.data.next(), 1.0)
        if item is END_OF_EPOCH:
            self.epoch += 1
            self.epoch_keys.next_epoch()
            self.resumed_epoch = None
        return item, weight

    def micro_step(self, batch: MicroBatch, weight: float) -> bool:
        """Forward and backward of one micro-batch, its keys recorded as trained; True when the step is due."""
        due = self.step.micro_step(batch, weight=weight)
        self.epoch_keys.add(batch.keys)
        return due

    def optimizer_step(self) -> None:
        stats = self.step.optimizer_step()
        self.meter.record(loss=stats.loss, grad_norm=stats.grad_norm)

    def maybe_log(self) -> None:
        cfg, step = self.cfg, self.step.step
        if not (step % cfg.log_every == 0 or step in (1, cfg.steps)):
            return
        stats = self.meter.flush(samples_per_step=cfg.batch_size * cfg.grad_accum * self.worker.world,
                                 tokens_per_sample=(cfg.res // 16) ** 2, step=step)
        scheduler = self.step.scheduler
        stats["lr"] = cfg.base_lr * scheduler.get_last_lr()[0] / scheduler.base_lrs[0]  # muP base lr in effect
        self.run.log_metrics(stats, step=step)
        if self.worker.is_chief:
            eta = (cfg.steps - step) / max(stats["steps_per_s"], 1e-9)
            name = cfg.tracking.run_name or cfg.run_name
            print(f"[{name}] step {step}/{cfg.steps} loss {stats['loss']:.4f} "
                  f"{stats['samples_per_s']:.1f} samples/s data-wait {stats['data_wait']:.1%} "
                  f"ETA {eta / 60:.1f} min", flush=True)
            progress.emit(done=step, total=cfg.steps, unit="step", rate=stats["steps_per_s"],
                          note=f"loss {stats['loss']:.4f}")

    def maybe_sample(self) -> None:
        step = self.step.step
        if self.worker.is_chief and (step >= self.cfg.steps or step % self.cfg.sample.every == 0):
            _log_samples(self.run, self.step.net, ema=self.step.ema, text_encoder=self.text_encoder, vae_id=self.vae,
                         cfg=self.cfg, device=self.worker.device, step=step)

    def maybe_checkpoint(self) -> None:
        """A checkpoint every `checkpoint_every` steps and at the end, written while the next steps run
        (BackgroundCheckpoints) and reported at the next log step, the next checkpoint or the end."""
        cfg, step = self.cfg, self.step
        final = step.step >= cfg.steps
        due = final or step.step % cfg.checkpoint_every == 0
        if self.checkpoints.pending is not None and (due or step.step % cfg.log_every == 0):
            self.report_checkpoint()
        if not due:
            return
        self.meter.check_finite(step.step)  # weights a NaN reached are never saved
        if final and self.run.enabled:
            self.run.set_tags({FINAL_WEIGHTS_TAG: weights_digest(step.net)})
        keys = self.epoch_keys.gather()  # every rank takes part
        write = checkpoint_writer(model=step.model, cfg=cfg, vae=self.vae, optimizer=step.optimizer,
                                  scheduler=step.scheduler, ema=step.ema, progress={"step": step.step, "epoch": self.epoch},
                                  epoch_keys=keys) if self.worker.is_chief else None
        self.checkpoints.start({"step": step.step, "loss": self.meter.last_loss}, write=write,
                               commit_file=checkpoint.META,
                               name=f"checkpoint_{step.step:08d}_{uuid.uuid4().hex[:8]}")  # a relaunch never reuses one
        if final:
            self.report_checkpoint()

    def report_checkpoint(self) -> None:
        """Report the pending checkpoint, the steps logged before it sent first (briefly: an MLflow outage does
        not hold training up): a relaunch from it then finds them in the run and logs only the later ones."""
        self.run.flush(timeout_s=CHECKPOINT_FLUSH_S)
        self.checkpoints.finish()


def _log_samples(run: StageRun, net, *, ema: EMA | None, text_encoder, vae_id: str, cfg: TrainStageConfig, device,
                 step: int) -> None:
    """A grid of the fixed prompts x seeds (rows x columns) as an MLflow artifact; EMA weights when kept."""
    if not run.enabled:
        return
    from hdm_model import LatentVAE
    from hdm_model.pipeline import HDMPipeline, make_grid

    vae = LatentVAE.from_pretrained(node_copy(vae_id, cfg.s3), device=device)  # s3://: the node's copy
    was_training = net.training
    with ema.applied(net) if ema is not None else nullcontext(net) as weights:
        pipe = HDMPipeline(weights, text_encoder, vae)
        images = pipe(cfg.sample.prompts, negative_prompt=cfg.sample.negative_prompt, width=cfg.res,
                      height=cfg.res, steps=cfg.sample.steps, cfg_scale=cfg.sample.cfg_scale, seeds=cfg.sample.seeds)
    net.train(was_training)
    run.log_image(make_grid(images, cols=len(cfg.sample.seeds)), f"samples/step-{step:07d}.png")
