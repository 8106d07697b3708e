"""The Ray Train worker of a progressive-resolution training stage (the driver is pipelines/stage.py).

Each worker reads its shard of LATENTS/res=R through Ray Data (equal shards, drop_last). Per micro-batch, prepared ahead by a background thread, a fresh shifted square crop of each stored
latent in latent space (posterior resampled when its std is stored); captions encoded online by the frozen text encoder (some replaced by
the null prompt), the flow-matching loss with TREAD; muP AdamW, warm-up + cosine, accumulation, clipping,
optional EMA; checkpoints every K steps through `ray.train.report`, resumed on relaunch or worker failure.
"""

from __future__ import annotations

import hashlib
import json
import queue
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from hdm_model.pipeline import EMA_WEIGHTS_NAME

from .cluster import epoch_batches, set_train_threads
from .configs import S3Options, StageConfig
from .secrets import redact
from .storage import resolve
from .tracking import StageRun

STATE_NAME = "training_state.pt"
EMA_NAME = EMA_WEIGHTS_NAME  # what sampling loads instead of model.safetensors when present


# ---------------------------------------------------------------------------------------------------
# Worker side

class LatentBatcher:
    """Rows of the latent Parquet -> model inputs: square crops, their positions, log aspect, captions."""

    def __init__(self, *, caption_dropout: float, seed: int):
        self.caption_dropout = caption_dropout
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        from hdm_model import crop_latent

        latents, positions = [], []
        for i, raw in enumerate(batch["latent"]):
            shape = tuple(int(s) for s in batch["latent_shape"][i])
            z = torch.from_numpy(np.frombuffer(raw, np.float16).reshape(shape).astype(np.float32))
            std = batch["latent_std"][i] if "latent_std" in batch else None
            if std is not None:  # a fresh posterior sample, as HDM trains on .sample()
                s = torch.from_numpy(np.frombuffer(std, np.float16).reshape(shape).astype(np.float32))
                z = z + s * torch.randn(shape, generator=self.gen)
            crop, pos = crop_latent(z, generator=self.gen)
            latents.append(crop)
            positions.append(pos)
        captions = ["" if self.rng.random() < self.caption_dropout else str(c) for c in batch["caption"]]
        aspect = torch.log(torch.as_tensor(batch["aspect"], dtype=torch.float32))
        return torch.stack(latents), torch.stack(positions), aspect, captions


END_OF_EPOCH = object()


class BatchPrefetcher:
    """The worker's shard as ready model inputs, prepared `depth` batches ahead by a background thread.

    The thread iterates epoch after epoch from `epoch` (skipping the first `skip` batches, to resume within
    an epoch), runs `batcher` on each batch (fp16 decode, posterior draw, crops) and queues the result, then
    END_OF_EPOCH. So the step does not wait when Ray Data starts an epoch (~0.1 s on CPU, much more on a
    busy node: a small set has an epoch every few steps) and the per-sample work overlaps the step.
    With `shuffle_buffer`, each epoch draws its batches from a buffer of that many rows, seeded by
    (`seed`, epoch): a new order every epoch, and the same order again when a run resumes mid-epoch.
    `next()` returns the next item and raises whatever the thread raised.
    """

    def __init__(self, shard, batcher: Callable[[dict[str, np.ndarray]], Any], *, batch_size: int, skip: int = 0,
                 epoch: int = 0, shuffle_buffer: int = 0, seed: int = 0, depth: int = 4):
        self.shard, self.batcher, self.batch_size, self.skip = shard, batcher, batch_size, skip
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
            skip, epoch = self.skip, self.epoch
            while not self.stopped.is_set():
                seen = 0
                for batch in epoch_batches(self.shard, batch_size=self.batch_size, shuffle_buffer=self.shuffle_buffer,
                                           seed=self.seed + epoch, prefetch_batches=2):
                    seen += 1
                    if skip:
                        skip -= 1
                    elif not self._put(self.batcher(batch)):
                        return
                if not seen:
                    raise RuntimeError(f"no batch of {self.batch_size} latents in this worker's shard "
                                       "(fewer rows than workers x batch size)")
                if not self._put(END_OF_EPOCH):
                    return
                epoch += 1
        except BaseException as error:  # handed to the training loop, which raises it
            self._put(error)

    def _put(self, item: Any) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


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

    def load(self, path: Path) -> None:
        """EMA weights saved by `save_checkpoint`, onto the device the shadow lives on."""
        from safetensors.torch import load_file

        state = load_file(path, device=str(next(iter(self.shadow.values())).device))
        if state.keys() != self.shadow.keys():
            raise KeyError(f"EMA weights in {path} do not fit this model")
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


def _checkpoint_meta(cfg: StageConfig, model_config, vae: str) -> dict[str, Any]:
    return {"model": model_config.to_dict(), "text_encoder": {"id": cfg.text_encoder, "max_length": cfg.ctx_length},
            "vae": vae, "stage": redact(cfg.model_dump(mode="json"))}  # checkpoints are shared: no credentials


def save_checkpoint(directory: Path, *, model, cfg: StageConfig, vae: str, optimizer, scheduler, ema: EMA | None,
                    progress: dict[str, int], rng: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from hdm_model.denoiser import CONFIG_NAME, WEIGHTS_NAME

    net = _unwrap(model)
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, directory / WEIGHTS_NAME)
    if ema is not None:
        save_file({k: v.contiguous().cpu() for k, v in ema.shadow.items()}, directory / EMA_NAME)
    (directory / CONFIG_NAME).write_text(json.dumps(_checkpoint_meta(cfg, net.config, vae), indent=2))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **progress, "rng": rng},
               directory / STATE_NAME)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the weights (sorted names, float32 bytes): lineage checks across stages."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_weights(model: torch.nn.Module, directory: str) -> None:
    """Denoiser weights of a checkpoint directory (our names) or a released HDM .safetensors file."""
    from safetensors.torch import load_file

    from hdm_model.denoiser import WEIGHTS_NAME
    from hdm_model.official import official_to_ours

    path = Path(directory)
    if path.is_dir():
        state = load_file(path / WEIGHTS_NAME)
    else:
        state = official_to_ours(load_file(path), _unwrap(model).config)
    missing, unexpected = _unwrap(model).load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"weights in {directory} do not fit this model: missing {sorted(missing)[:10]}, "
                       f"unexpected {sorted(unexpected)[:10]}")


def train_loop(loop_config: dict) -> None:
    """One Ray Train worker: the training loop reads like its table of contents."""
    import ray.train
    import ray.train.torch

    from hdm_model import (TextEncoder, build_denoiser, build_optimizer, flow_matching_loss,
                           warmup_cosine_schedule)

    cfg = StageConfig.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    set_train_threads(device, ctx.get_local_world_size(), cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    text_encoder = TextEncoder.from_pretrained(cfg.text_encoder, max_length=cfg.ctx_length, device=device,
                                               cache_size=cfg.text_cache_size)
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
    progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    if resume is not None:
        with resume.as_directory() as d:
            progress = _restore(Path(d), net, optimizer, scheduler, ema)
    run = StageRun.attach(tracking_uri=loop_config["tracking_uri"], run_id=loop_config["run_id"]) if rank == 0 \
        else StageRun(None, None)
    if resume is not None:
        run.set_tags({"hdm.resumed_at_step": progress["step"]})
    elif init:
        run.set_tags({"hdm.init_weights_sha256": weights_digest(net)})
    batcher = LatentBatcher(caption_dropout=cfg.caption_dropout, seed=cfg.seed + 7919 * rank + progress["step"])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    meter = _Meter()
    micro = 0
    loss_sum = 0.0

    def train_step() -> None:
        nonlocal loss_sum
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(net)
        progress["step"] += 1
        meter.record(loss_sum / cfg.grad_accum, float(grad_norm))
        loss_sum = 0.0

    def log() -> None:
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
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                save_checkpoint(Path(tmp), model=model, cfg=cfg, vae=loop_config["vae"], optimizer=optimizer,
                                scheduler=scheduler, ema=ema, progress=dict(progress), rng=_rng_state())
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)

    # Resumes the data position within the interrupted epoch. Data wait: the loop blocked on the next batch.
    data = BatchPrefetcher(ray.train.get_dataset_shard("train"), batcher, batch_size=cfg.batch_size,
                           skip=progress["batch_in_epoch"], epoch=progress["epoch"], shuffle_buffer=cfg.shuffle_buffer,
                           seed=cfg.seed + 7919 * rank)
    try:
        while progress["step"] < cfg.steps:
            meter.wait_start()
            item = data.next()
            meter.wait_end()
            if item is END_OF_EPOCH:
                progress["epoch"] += 1
                progress["batch_in_epoch"] = 0
                continue
            z0, pos, aspect, captions = item
            ctx_states = text_encoder(captions, padding="max_length").float()
            z0, pos, aspect, ctx_states = (t.to(device) for t in (z0, pos, aspect, ctx_states))
            micro += 1
            sync = micro % cfg.grad_accum == 0
            with (nullcontext() if sync or world == 1 else model.no_sync()), autocast:
                loss = flow_matching_loss(model, z0, ctx_states, pos_map=pos, aspect=aspect)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item()
            progress["batch_in_epoch"] += 1
            if sync:
                train_step()
                if progress["step"] % cfg.log_every == 0 or progress["step"] in (1, cfg.steps):
                    log()
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

    def record(self, loss: float, grad_norm: float) -> None:
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        self.last_loss = loss

    def flush(self, *, samples_per_step: int, tokens_per_sample: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.since, 1e-9)
        steps = len(self.losses)
        out = {"loss": float(np.mean(self.losses)), "grad_norm": float(np.mean(self.grad_norms)),
               "steps_per_s": steps / elapsed, "samples_per_s": steps * samples_per_step / elapsed,
               "image_tokens_per_s": steps * samples_per_step * tokens_per_sample / elapsed,
               "data_wait": self.wait / elapsed}
        self.losses, self.grad_norms, self.wait, self.since = [], [], 0.0, time.perf_counter()
        return out


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore(directory: Path, net, optimizer, scheduler, ema: EMA | None) -> dict[str, int]:
    from safetensors.torch import load_file

    from hdm_model.denoiser import WEIGHTS_NAME

    net.load_state_dict(load_file(directory / WEIGHTS_NAME, device=str(next(net.parameters()).device)))
    state = torch.load(directory / STATE_NAME, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None and (directory / EMA_NAME).exists():
        ema.load(directory / EMA_NAME)
    elif ema is not None:  # EMA turned on at this relaunch: it starts from the restored weights
        ema.reset(net)
    torch.set_rng_state(state["rng"]["torch"])
    return {k: int(state[k]) for k in ("step", "epoch", "batch_in_epoch")}


def _log_samples(run: StageRun, net, ema: EMA | None, text_encoder, vae_id: str, cfg: StageConfig, device,
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
