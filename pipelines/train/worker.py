"""The Ray Train worker of a progressive-resolution training stage (the driver is pipelines/train/stage.py).

Each worker reads its shard of LATENTS/res=R through Ray Data (equal shards, drop_last). Per micro-batch,
prepared ahead by a background thread, a fresh shifted square crop of each stored latent in latent space
(posterior resampled when its std is stored); captions encoded online by the frozen text encoder (some replaced
by the null prompt), the flow-matching loss with TREAD; muP AdamW, warm-up + cosine, accumulation, clipping,
optional EMA; checkpoints every K steps through `ray.train.report`, resumed on relaunch or worker failure.
A checkpoint records the latent keys trained in its epoch, so a resume trains each of the others once
(whatever the read order or worker count), and every draw is seeded (see "Randomness" below).
"""

from __future__ import annotations

import hashlib
import queue
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from hdm_model import checkpoint

from pipelines.cluster import epoch_batches, set_train_threads
from pipelines.config import S3Options
from pipelines.train.config import TrainStageConfig
from pipelines.secrets import redact
from pipelines.storage import resolve
from pipelines.tracking import StageRun


# ---------------------------------------------------------------------------------------------------
# Worker side

# Randomness: every draw of training comes from an explicit generator, never from torch's global RNG (which
# seeds only the model's init, the same on every rank: DDP broadcasts rank 0's weights anyway). Two streams:
# - the step's draws (timesteps, noise, TREAD mask), made when a micro-batch runs, on the device: seeded by
#   (seed, rank, optimizer step, micro-step), so ranks differ and a resumed run draws what the uninterrupted
#   run drew from the same step on;
# - a sample's draws (posterior sample, crop offset, caption dropout), made by the prefetch thread AHEAD of
#   the step: seeded by (seed, epoch, latent key), not by rank or position, so they hold whatever the read
#   order, the worker count or the prefetch depth, and a resume with another worker count draws the same.
_STEP, _SAMPLE, _SHUFFLE = 0, 1, 2  # stream tags mixed into the seeds


def derive_seed(*words: int | str) -> int:
    """A 64-bit seed mixed from `words` by numpy's SeedSequence, strings through blake2b: the same in every
    process and Python version (unlike hash(), which is salted per process)."""
    entropy = [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") if isinstance(w, str)
               else w % 2**64 for w in words]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


def step_generator(*, seed: int, rank: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    """Timesteps, noise and TREAD mask of micro-step `micro` of optimizer step `step` on `rank`."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, _STEP, rank, step, micro))


def sample_generator(*, seed: int, epoch: int, key: str) -> torch.Generator:
    """Posterior sample, crop offset and caption dropout of the latent `key` in `epoch`."""
    return torch.Generator().manual_seed(derive_seed(seed, _SAMPLE, epoch, key))


@dataclass
class MicroBatch:
    latents: torch.Tensor  # (B, C, s, s) square crops
    positions: torch.Tensor  # (B, s*s, 2) their slices of the whole-image position maps
    aspect: torch.Tensor  # (B,) log(W / H) of the whole images
    captions: list[str]
    keys: list[str]  # latent keys: what a checkpoint records as trained


class LatentBatcher:
    """Rows of the latent Parquet -> a MicroBatch: square crops, their positions, log aspect, captions."""

    def __init__(self, *, caption_dropout: float, seed: int):
        self.caption_dropout, self.seed = caption_dropout, seed

    def __call__(self, batch: dict[str, np.ndarray], *, epoch: int) -> MicroBatch:
        from hdm_model import crop_latent

        latents, positions, captions = [], [], []
        for i, key in enumerate(batch["key"]):
            gen = sample_generator(seed=self.seed, epoch=epoch, key=str(key))
            shape = tuple(int(s) for s in batch["latent_shape"][i])
            z = torch.from_numpy(np.frombuffer(batch["latent"][i], np.float16).reshape(shape).astype(np.float32))
            std = batch["latent_std"][i] if "latent_std" in batch else None
            if std is not None:  # a fresh posterior sample, as HDM trains on .sample()
                s = torch.from_numpy(np.frombuffer(std, np.float16).reshape(shape).astype(np.float32))
                z = z + s * torch.randn(shape, generator=gen)
            crop, pos = crop_latent(z, generator=gen)
            latents.append(crop)
            positions.append(pos)
            dropped = float(torch.rand((), generator=gen)) < self.caption_dropout
            captions.append("" if dropped else str(batch["caption"][i]))
        aspect = torch.log(torch.as_tensor(batch["aspect"], dtype=torch.float32))
        return MicroBatch(latents=torch.stack(latents), positions=torch.stack(positions), aspect=aspect,
                          captions=captions, keys=[str(k) for k in batch["key"]])


def blank_batch(*, channels: int, side: int) -> MicroBatch:
    """One zero latent with the empty caption: what a rank out of data trains on with weight 0 (ResumedEpoch)."""
    from hdm_model import crop_latent

    crop, pos = crop_latent(torch.zeros(channels, side, side), offset=(0, 0))
    return MicroBatch(latents=crop[None], positions=pos[None], aspect=torch.zeros(1), captions=[""], keys=[])


def without_keys(batches: Iterable[dict[str, np.ndarray]], *, drop: frozenset[str],
                 batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """`batches` less the rows whose key is in `drop`, regrouped into batches of `batch_size` rows in the
    order read; a smaller last batch is dropped."""
    pending: dict[str, np.ndarray] | None = None
    for batch in batches:
        keep = np.fromiter((str(k) not in drop for k in batch["key"]), dtype=bool, count=len(batch["key"]))
        rows = {name: column[keep] for name, column in batch.items()}
        pending = rows if pending is None else {k: np.concatenate([pending[k], rows[k]]) for k in rows}
        while len(pending["key"]) >= batch_size:
            yield {k: v[:batch_size] for k, v in pending.items()}
            pending = {k: v[batch_size:] for k, v in pending.items()}


END_OF_EPOCH = object()


class BatchPrefetcher:
    """The worker's shard as ready model inputs, prepared `depth` batches ahead by a background thread.

    The thread iterates epoch after epoch from `epoch`, runs `batcher(batch, epoch=...)` on each batch (fp16
    decode, posterior draw, crops) and queues the result, then END_OF_EPOCH. So the step does not wait when
    Ray Data starts an epoch (~0.1 s on CPU, much more on a busy node: a small set has an epoch every few
    steps) and the per-sample work overlaps the step. To resume within an epoch, its first epoch leaves out
    the rows whose key is in `done_keys` (what the checkpoint recorded as trained, by every rank), whatever
    the read order or worker count; that epoch may then hold fewer batches on one rank than on another.
    With `shuffle_buffer`, each epoch draws its batches from a buffer of that many rows, seeded by
    (`seed`, epoch): a new order every epoch. `next()` returns the next item and raises whatever the thread
    raised.
    """

    def __init__(self, shard, batcher: Callable[..., Any], *, batch_size: int, epoch: int = 0,
                 done_keys: frozenset[str] = frozenset(), shuffle_buffer: int = 0, seed: int = 0, depth: int = 4):
        self.shard, self.batcher, self.batch_size, self.done_keys = shard, batcher, batch_size, done_keys
        self.epoch, self.shuffle_buffer, self.seed = epoch, shuffle_buffer, seed
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._fill, name="batch-prefetch", daemon=True)
        self.thread.start()

    def next(self) -> Any:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self, wait_s: float = 0.0) -> None:
        """Stops the thread at its next batch, waiting up to `wait_s` for it to end (it is a daemon: one
        blocked in Ray Data, say on an epoch the other workers never start, dies with the worker)."""
        self.stopped.set()
        if wait_s:
            self.thread.join(wait_s)

    def _fill(self) -> None:
        try:
            drop, epoch = self.done_keys, self.epoch
            while not self.stopped.is_set():
                if not self._epoch(epoch, drop):
                    return
                drop, epoch = frozenset(), epoch + 1
        except BaseException as error:  # handed to the training loop, which raises it
            self._put(error)

    def _epoch(self, epoch: int, drop: frozenset[str]) -> bool:
        """Queues one epoch's batches and END_OF_EPOCH; False when stopped."""
        batches = epoch_batches(self.shard, batch_size=self.batch_size, shuffle_buffer=self.shuffle_buffer,
                                seed=derive_seed(self.seed, _SHUFFLE, epoch) % 2**32, prefetch_batches=2,
                                drop_last=not drop)
        if drop:
            batches = without_keys(batches, drop=drop, batch_size=self.batch_size)
        seen = 0
        for batch in batches:
            seen += 1
            if not self._put(self.batcher(batch, epoch=epoch)):
                return False
        if not seen and not drop:
            raise RuntimeError(f"no batch of {self.batch_size} latents in this worker's shard "
                               "(fewer rows than workers x batch size)")
        return self._put(END_OF_EPOCH)

    def _put(self, item: Any) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


class EpochKeys:
    """The latent keys trained in the current epoch: those a resumed checkpoint recorded, plus this rank's."""

    def __init__(self, done: frozenset[str] = frozenset()):
        self.done, self.mine = done, []

    def add(self, keys: list[str]) -> None:
        self.mine.extend(keys)

    def next_epoch(self) -> None:
        self.done, self.mine = frozenset(), []

    def gather(self) -> list[str]:
        """Every rank's keys, sorted, a key trained twice listed twice (a collective: every rank calls it)."""
        import torch.distributed as dist

        ranks = [self.mine]
        if dist.is_available() and dist.is_initialized():
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, self.mine)
        return sorted([*self.done, *(key for keys in ranks for key in keys)])


class ResumedEpoch:
    """Keeps DDP's ranks in step through an epoch resumed by keys, where one rank can hold more batches than
    another (DDP hangs unless every rank runs the same number of backward passes).

    Before each micro-batch the ranks count, by an all-reduce, how many still have one. None: the epoch ends
    on every rank. Some: a rank out of data trains on `blank` with loss weight 0, the others weigh their loss
    by world / count, so DDP's gradient mean is the mean over the real batches only, and every key left in
    the epoch is trained once. Used only in that epoch: the others are even (equal shards, drop_last).
    """

    def __init__(self, *, world: int, device: torch.device, blank: MicroBatch):
        self.world, self.device, self.blank = world, device, blank
        self.out = False  # this rank has taken its END_OF_EPOCH and waits for the others

    def next(self, data: BatchPrefetcher) -> tuple[Any, float]:
        """(MicroBatch or END_OF_EPOCH, loss weight)."""
        import torch.distributed as dist

        item = END_OF_EPOCH if self.out else data.next()
        have = torch.tensor([item is not END_OF_EPOCH], dtype=torch.int64, device=self.device)
        dist.all_reduce(have)
        count = int(have.item())
        if count == 0:
            return END_OF_EPOCH, 0.0
        if item is END_OF_EPOCH:
            self.out = True
            return self.blank, 0.0
        return item, self.world / count


class EMA:
    """Exponential moving average of the weights, kept in float32 beside the model:
    after each optimizer step, shadow <- decay * shadow + (1 - decay) * weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.reset(model)

    def reset(self, model: torch.nn.Module) -> None:
        """Start the average at the model's current weights."""
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            self.shadow[k].lerp_(v.float(), 1 - self.decay)

    def load(self, directory: Path) -> None:
        """The EMA weights of a checkpoint directory, onto the device the shadow lives on."""
        state = checkpoint.load_ema(directory, device=next(iter(self.shadow.values())).device)
        if state is None or state.keys() != self.shadow.keys():
            raise KeyError(f"EMA weights in {directory} do not fit this model")
        self.shadow = state

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The model with the EMA weights loaded, its own weights put back on exit (sample grids)."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield model
        finally:
            model.load_state_dict(own)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def checkpoint_meta(cfg: TrainStageConfig, model_config, vae: str) -> checkpoint.CheckpointMeta:
    return checkpoint.CheckpointMeta(model=model_config, text_encoder=cfg.text_encoder, max_length=cfg.ctx_length,
                                     vae=vae, stage=redact(cfg.model_dump(mode="json")))  # shared: no credentials


def save_checkpoint(directory: Path, *, model, cfg: TrainStageConfig, vae: str, optimizer, scheduler, ema: EMA | None,
                    progress: dict[str, int], epoch_keys: list[str]) -> None:
    """`progress`: step and epoch; `epoch_keys`: the latent keys every rank trained in that epoch (EpochKeys).
    No RNG state: training draws from generators seeded by step and key, not from torch's global RNG."""
    net = _unwrap(model)
    checkpoint.save(directory, weights=net.state_dict(), meta=checkpoint_meta(cfg, net.config, vae),
                    ema=ema.shadow if ema is not None else None,
                    training_state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                    **progress, "epoch_keys": epoch_keys})


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

    path, net = Path(directory), _unwrap(model)
    if checkpoint.is_checkpoint(path):
        state = checkpoint.load_weights(path)
    else:
        state = denoiser_state_from_release(path, net.config)  # names and shapes checked against the model
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"weights in {directory} do not fit this model: missing {sorted(missing)[:10]}, "
                       f"unexpected {sorted(unexpected)[:10]}")


def train_loop(loop_config: dict) -> None:
    """One Ray Train worker: the training loop reads like its table of contents."""
    import ray.train
    import ray.train.torch

    from hdm_model import (TextEncoder, build_denoiser, build_optimizer, flow_matching_loss,
                           warmup_cosine_schedule)

    cfg = TrainStageConfig.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    set_train_threads(device, ctx.get_local_world_size(), cfg.torch_threads)
    text_encoder = TextEncoder.from_pretrained(cfg.text_encoder, max_length=cfg.ctx_length, device=device,
                                               cache_size=cfg.text_cache_size)
    torch.manual_seed(cfg.seed)  # the model's init only, the same on every rank; no training draw uses it
    model = build_denoiser(cfg.model, ctx_dim=text_encoder.hidden_size, tread_rate=cfg.tread_rate,
                           grad_checkpointing=cfg.grad_checkpointing, attn_kernel=cfg.attn_kernel)
    resume = ray.train.get_checkpoint()
    init = loop_config["init_from"]
    if resume is None and init:
        with _local(init, loop_config["s3"]) as path:
            load_weights(model, path)
    model = ray.train.torch.prepare_model(model)
    net = _unwrap(model)
    optimizer = build_optimizer(net, base_lr=cfg.base_lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    scheduler = warmup_cosine_schedule(optimizer, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps)
    ema = EMA(net, cfg.ema_decay) if cfg.ema_decay else None
    progress, done_keys = {"step": 0, "epoch": 0}, frozenset()
    if resume is not None:
        with resume.as_directory() as d:
            progress, done_keys = _restore(Path(d), net, optimizer, scheduler, ema)
    run = StageRun.attach(tracking_uri=loop_config["tracking_uri"], run_id=loop_config["run_id"]) if rank == 0 \
        else StageRun(None, None)
    if resume is not None:
        run.set_tags({"hdm.resumed_at_step": progress["step"]})
    elif init:
        run.set_tags({"hdm.init_weights_sha256": weights_digest(net)})
    epoch_keys = EpochKeys(done_keys)
    resumed_epoch = ResumedEpoch(world=world, device=device, blank=blank_batch(
        channels=net.config.in_channels, side=cfg.res // 8)) if done_keys and world > 1 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    meter = _Meter()
    micro = 0  # micro-step within the optimizer step
    losses: list[float] = []  # of this rank's micro-batches in the step (not the blank ones)

    def next_batch() -> tuple[Any, float]:
        """(MicroBatch or END_OF_EPOCH, loss weight). Data wait: the loop blocked on the next batch."""
        nonlocal resumed_epoch
        meter.wait_start()
        item, weight = resumed_epoch.next(data) if resumed_epoch is not None else (data.next(), 1.0)
        meter.wait_end()
        if item is END_OF_EPOCH:
            progress["epoch"] += 1
            epoch_keys.next_epoch()
            resumed_epoch = None
        return item, weight

    def micro_step(batch: MicroBatch, weight: float) -> bool:
        """Forward and backward of one micro-batch; True when it completes the accumulation."""
        nonlocal micro
        ctx_states = text_encoder(batch.captions, padding="max_length").float()
        z0, pos, aspect, ctx_states = (t.to(device) for t in (batch.latents, batch.positions, batch.aspect,
                                                                ctx_states))
        draws = step_generator(seed=cfg.seed, rank=rank, step=progress["step"], micro=micro, device=device)
        sync = micro + 1 == cfg.grad_accum
        with (nullcontext() if sync or world == 1 else model.no_sync()), autocast:
            loss = flow_matching_loss(model, z0, ctx_states, pos_map=pos, aspect=aspect, generator=draws)
        (loss * weight / cfg.grad_accum).backward()
        micro = 0 if sync else micro + 1
        if batch.keys:
            losses.append(loss.item())
            epoch_keys.add(batch.keys)
        return sync

    def train_step() -> None:
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(net)
        progress["step"] += 1
        meter.record(float(np.mean(losses)) if losses else None, float(grad_norm))
        losses.clear()

    def maybe_log() -> None:
        if not (progress["step"] % cfg.log_every == 0 or progress["step"] in (1, cfg.steps)):
            return
        stats = meter.flush(samples_per_step=cfg.batch_size * cfg.grad_accum * world,
                            tokens_per_sample=(cfg.res // 16) ** 2)
        stats["lr"] = cfg.base_lr * scheduler.get_last_lr()[0] / scheduler.base_lrs[0]  # muP base lr in effect
        run.log_metrics(stats, step=progress["step"])
        if rank == 0:
            eta = (cfg.steps - progress["step"]) / max(stats["steps_per_s"], 1e-9)
            name = cfg.tracking.run_name or cfg.run_name
            print(f"[{name}] step {progress['step']}/{cfg.steps} loss {stats['loss']:.4f} "
                  f"{stats['samples_per_s']:.1f} samples/s data-wait {stats['data_wait']:.1%} "
                  f"ETA {eta / 60:.1f} min", flush=True)

    def maybe_sample() -> None:
        final = progress["step"] >= cfg.steps
        if rank == 0 and (final or progress["step"] % cfg.sample.every == 0):
            _log_samples(run, net, ema, text_encoder, loop_config["vae"], cfg, device, progress["step"])

    def maybe_checkpoint() -> None:
        final = progress["step"] >= cfg.steps
        metrics = {"step": progress["step"], "loss": meter.last_loss}
        if not (final or progress["step"] % cfg.checkpoint_every == 0):
            return
        if final:
            run.set_tags({"hdm.final_weights_sha256": weights_digest(net)})
        keys = epoch_keys.gather()  # every rank takes part
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                save_checkpoint(Path(tmp), model=model, cfg=cfg, vae=loop_config["vae"], optimizer=optimizer,
                                scheduler=scheduler, ema=ema, progress=dict(progress), epoch_keys=keys)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)

    # A resumed run starts in the checkpoint's epoch, without the keys trained in it.
    data = BatchPrefetcher(ray.train.get_dataset_shard("train"), LatentBatcher(
        caption_dropout=cfg.caption_dropout, seed=cfg.seed), batch_size=cfg.batch_size, epoch=progress["epoch"],
        done_keys=done_keys, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed)
    try:
        while progress["step"] < cfg.steps:
            item, weight = next_batch()
            if item is not END_OF_EPOCH and micro_step(item, weight):
                train_step()
                maybe_log()
                maybe_sample()
                maybe_checkpoint()
    finally:
        data.close()


class _Meter:
    """Loss, grad norm, throughput and the share of time spent waiting for data."""

    def __init__(self):
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.wait = 0.0
        self.since = time.perf_counter()
        self._t = None
        self.last_loss = float("nan")

    def wait_start(self) -> None:
        self._t = time.perf_counter()

    def wait_end(self) -> None:
        if self._t is not None:
            self.wait += time.perf_counter() - self._t
            self._t = None

    def record(self, loss: float | None, grad_norm: float) -> None:
        """`loss` None: this rank trained only blank batches in the step (ResumedEpoch)."""
        if loss is not None:
            self.losses.append(loss)
            self.last_loss = loss
        self.grad_norms.append(grad_norm)

    def flush(self, *, samples_per_step: int, tokens_per_sample: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.since, 1e-9)
        steps = len(self.grad_norms)
        out = {"loss": float(np.mean(self.losses)) if self.losses else float("nan"),
               "grad_norm": float(np.mean(self.grad_norms)),
               "steps_per_s": steps / elapsed, "samples_per_s": steps * samples_per_step / elapsed,
               "image_tokens_per_s": steps * samples_per_step * tokens_per_sample / elapsed,
               "data_wait": self.wait / elapsed}
        self.losses, self.grad_norms, self.wait, self.since = [], [], 0.0, time.perf_counter()
        return out


def _restore(directory: Path, net, optimizer, scheduler, ema: EMA | None) -> tuple[dict[str, int], frozenset[str]]:
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


def _log_samples(run: StageRun, net, ema: EMA | None, text_encoder, vae_id: str, cfg: TrainStageConfig, device,
                 step: int) -> None:
    """A grid of the fixed prompts x seeds (rows x columns) as an MLflow artifact; EMA weights when kept."""
    if not run.enabled:
        return
    from hdm_model import LatentVAE
    from hdm_model.pipeline import HDMPipeline, make_grid

    vae = LatentVAE.from_pretrained(vae_id, device=device)
    was_training = net.training
    with ema.applied(net) if ema is not None else nullcontext(net) as weights:
        pipe = HDMPipeline(weights, text_encoder, vae)
        images = pipe(cfg.sample.prompts, negative_prompt=cfg.sample.negative_prompt, width=cfg.res,
                      height=cfg.res, steps=cfg.sample.steps, cfg_scale=cfg.sample.cfg_scale, seeds=cfg.sample.seeds)
    net.train(was_training)
    run.log_image(make_grid(images, cols=len(cfg.sample.seeds)), f"samples/step-{step:07d}.png")


class _local:
    """A local path for a checkpoint URI: s3:// copied into a temporary directory."""

    def __init__(self, uri: str, s3: dict):
        self.uri, self.s3, self.tmp = uri, s3, None

    def __enter__(self) -> str:
        if not self.uri.startswith("s3://"):
            return self.uri
        import pyarrow.fs as pafs

        fs, path = resolve(self.uri, S3Options.model_validate(self.s3))
        self.tmp = tempfile.TemporaryDirectory()
        pafs.copy_files(path, self.tmp.name, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return self.tmp.name

    def __exit__(self, *exc):
        if self.tmp is not None:
            self.tmp.cleanup()
        return False
