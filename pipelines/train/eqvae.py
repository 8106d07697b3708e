"""EQ-VAE fine-tuning (or training from scratch) on Ray Train (eqvae_spec.md).

    images (the precompute job's readers) -> decode, resize short side to S (Ray Data tasks)
      -> Ray Train workers (DDP; gloo on CPU): random S x S crops + flips, EQ-VAE objective, AdamW
      -> rank 0: held-out PSNR and equivariance error before/after, reconstruction grids (MLflow),
         per-channel latent mean/std written into the config, save_pretrained to the output URI.

Bad inputs become rows of an error log (an actor, counted once per key), never training samples.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
import torch

from pipelines.cluster import epoch_batches, scaling, set_train_threads
from pipelines.train.config import VAETrainConfig
from pipelines.data.images import TransformSpec
from pipelines.data.precompute import PrepareStage, ReadStage
from pipelines.data.sources import list_units
from pipelines.storage import resolve
from pipelines.tracking import StageRun

FIXED_TRANSFORMS = [(0.5, 0), (0.75, 1), (1.0, 1), (1.0, 2), (0.625, 3)]  # (scale, quarter turns) for eval


@ray.remote(num_cpus=0)
class ErrorLog:
    """Rejected inputs, once per key however many epochs re-read them."""

    def __init__(self):
        self.reasons: dict[str, str] = {}

    def record(self, rows: list[dict]) -> None:
        for row in rows:
            self.reasons.setdefault(row["key"], row["reason"])

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for reason in self.reasons.values():
            code = reason.split(":", 1)[0]
            out[code] = out.get(code, 0) + 1
        return out


@dataclass
class KeepImages:
    """Items -> (key, pixels, h, w) rows; error rows go to the error log."""

    error_log: Any

    def __call__(self, batch: pa.Table) -> pa.Table:
        errors = batch.filter(pc.equal(batch["kind"], "error"))
        if errors.num_rows:
            self.error_log.record.remote(errors.select(["key", "reason"]).to_pylist())
        items = batch.filter(pc.equal(batch["kind"], "item")).to_pylist()
        return pa.table({"key": [r["key"] for r in items], "pixels": [r["pixels"][0] for r in items],
                         "h": [r["pix_h"][0] for r in items], "w": [r["pix_w"][0] for r in items]},
                        schema=pa.schema([("key", pa.string()), ("pixels", pa.binary()), ("h", pa.int32()),
                                          ("w", pa.int32())]))


def is_held_out(key: str) -> bool:
    """One key in eight, by hash: stable across runs and machines."""
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 8 == 0


def to_images(rows: dict[str, np.ndarray], size: int, rng: np.random.Generator | None,
              min_scale: float = 1.0) -> torch.Tensor:
    """Square crops (B, 3, S, S) in [-1, 1]: with rng, each image shrunk by a random factor in [min_scale, 1]
    (never below S), then a random crop and a horizontal flip half the time; without rng, centre crops."""
    from PIL import Image

    out = []
    for pix, h, w in zip(rows["pixels"], rows["h"], rows["w"]):
        img = np.frombuffer(pix, np.uint8).reshape(h, w, 3)
        if rng is not None and min_scale < 1:
            scale = max(rng.uniform(min_scale, 1.0), size / min(h, w))
            h, w = max(size, round(h * scale)), max(size, round(w * scale))
            img = np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC))
        top = int(rng.integers(0, h - size + 1)) if rng is not None else (h - size) // 2
        left = int(rng.integers(0, w - size + 1)) if rng is not None else (w - size) // 2
        crop = img[top:top + size, left:left + size]
        if rng is not None and rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(np.ascontiguousarray(crop))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class EQObjective(torch.nn.Module):
    """The EQ-VAE loss as a module, so DDP sees a forward pass and all-reduces the gradients."""

    def __init__(self, vae, eq_config, train_encoder: bool):
        super().__init__()
        self.vae, self.eq_config, self.train_encoder = vae, eq_config, train_encoder

    def forward(self, x: torch.Tensor, generator: torch.Generator):
        from hdm_model.eqvae import eq_vae_loss

        return eq_vae_loss(self.vae, x, self.eq_config, generator=generator, train_encoder=self.train_encoder)


def train_loop(loop_config: dict) -> None:
    """One Ray Train worker."""
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    from hdm_model.eqvae import (EQConfig, LatentMoments, Transform, build_vae, equivariance_error, psnr,
                                 reconstruct, set_latent_stats)

    cfg = VAETrainConfig.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    vae = build_vae(cfg.vae)
    vae.encoder.requires_grad_(cfg.train != "decoder")
    vae.quant_conv.requires_grad_(cfg.train != "decoder")
    vae.decoder.requires_grad_(cfg.train != "encoder")
    vae.post_quant_conv.requires_grad_(cfg.train != "encoder")
    eq = EQConfig(p_eq=cfg.p_eq, kl_weight=cfg.kl_weight, pixel_loss=cfg.pixel_loss,
                  lpips_weight=cfg.lpips_weight, adv_weight=cfg.adv_weight)
    objective = ray.train.torch.prepare_model(EQObjective(vae, eq, cfg.train != "decoder"))
    vae = objective.module.vae if isinstance(objective, DistributedDataParallel) else objective.vae
    device = next(vae.parameters()).device
    set_train_threads(device, ctx.get_local_world_size(), cfg.torch_threads)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    run = StageRun.attach(tracking_uri=loop_config["tracking_uri"], run_id=loop_config["run_id"]) if rank == 0 \
        else StageRun(None, None)
    held_out = torch.from_numpy(loop_config["eval"]).to(device)
    transforms = [Transform(scale=s, k=k) for s, k in FIXED_TRANSFORMS]

    def evaluate(tag: str) -> dict[str, float]:
        vae.eval()
        recon = reconstruct(vae, held_out)
        metrics = {f"{tag}/psnr": psnr(recon, held_out), f"{tag}/eq_error": equivariance_error(vae, held_out, transforms)}
        vae.train()
        run.log_image(_grid(held_out, recon), f"reconstructions/{tag}.png")
        return metrics

    results: dict[str, float] = evaluate("before") if rank == 0 else {}
    run.log_metrics(results, step=0)
    shard = ray.train.get_dataset_shard("train")
    rng = np.random.default_rng(cfg.seed + 1000 * rank)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + rank)
    step = 0
    start = time.monotonic()
    epoch = 0
    while step < cfg.steps:
        seen, epoch = 0, epoch + 1
        # a new order every epoch (seeded): a small set otherwise repeats the same batches in the same order
        for batch in epoch_batches(shard, batch_size=cfg.batch_size, shuffle_buffer=cfg.shuffle_buffer,
                                   seed=cfg.seed + 1000 * rank + epoch):
            seen += 1
            x = to_images(batch, cfg.crop_size, rng, cfg.min_scale).to(device)
            loss, parts = objective(x, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                run.log_metrics({**{f"train/{k}": v for k, v in parts.items()},
                                 "train/grad_norm": float(grad_norm)}, step=step)
                if rank == 0:
                    elapsed = time.monotonic() - start
                    print(f"[train-vae] step {step}/{cfg.steps} loss {loss.item():.4f} "
                          f"{step / elapsed:.1f} steps/s ETA {(cfg.steps - step) * elapsed / step / 60:.1f} min",
                          flush=True)
            if step >= cfg.steps:
                break
        if seen == 0:
            raise RuntimeError(f"no training batch of {cfg.batch_size} images per worker: too few usable inputs")

    moments = LatentMoments(channels=vae.config.latent_channels)
    with torch.no_grad():
        vae.eval()
        for i, batch in enumerate(shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy")):
            if i * cfg.batch_size * ctx.get_world_size() >= cfg.stats_images:
                break
            moments.update(vae.encode(to_images(batch, cfg.crop_size, None).to(device)).latent_dist.sample(gen))
    moments = _all_reduce(moments, device)
    mean, std = moments.mean_std()
    if rank == 0:
        results.update(evaluate("after"))
        set_latent_stats(vae, mean, std)
        run.log_metrics(results, step=step)
        run.log_params({"latents_mean": mean, "latents_std": std})
        with tempfile.TemporaryDirectory() as tmp:
            vae.save_pretrained(tmp)
            _upload(tmp, loop_config["output"], loop_config["s3"])
    metrics = {**results, "step": step, "latents_mean": mean, "latents_std": std}
    with tempfile.TemporaryDirectory() as tmp:  # Ray Train keeps the metrics of reports with a checkpoint
        checkpoint = None
        if rank == 0:
            Path(tmp, "metrics.json").write_text(json.dumps(metrics))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def _all_reduce(moments, device):
    """Sum the workers' partial moments (count, sum, sum of squares per channel)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        packed = moments.to_tensor(device=device)
        dist.all_reduce(packed)
        return type(moments).from_tensor(packed.cpu())
    return moments


def _grid(images: torch.Tensor, recon: torch.Tensor, limit: int = 8) -> np.ndarray:
    """Originals on the top row, reconstructions below: (2S, n*S, 3) uint8."""
    rows = [torch.cat(list(t[:limit]), dim=-1) for t in (images, recon)]  # each (3, S, n*S)
    grid = torch.cat(rows, dim=-2)
    return ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def _upload(local_dir: str, output: str, s3: dict) -> None:
    from pipelines.config import S3Options

    fs, path = resolve(output, S3Options.model_validate(s3))
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


@dataclass
class VAETrainSummary:
    output: str
    metrics: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    run_id: str | None = None

    def format(self) -> str:
        m = self.metrics
        return (f"train-vae -> {self.output}\n"
                f"  held-out PSNR {m.get('before/psnr', float('nan')):.2f} -> {m.get('after/psnr', float('nan')):.2f} dB, "
                f"equivariance error {m.get('before/eq_error', float('nan')):.4f} -> {m.get('after/eq_error', float('nan')):.4f}\n"
                f"  latents_mean {np.round(m.get('latents_mean', []), 4).tolist()}, "
                f"latents_std {np.round(m.get('latents_std', []), 4).tolist()}\n"
                f"  input errors: {self.errors or 'none'}; MLflow run: {self.run_id or 'tracking off'}")


def run_vae_training(config: VAETrainConfig) -> VAETrainSummary:
    """Run on the Ray cluster this process is connected to."""
    from ray.train import DataConfig, RunConfig
    from ray.train.torch import TorchTrainer

    if config.lpips_weight or config.adv_weight:
        raise ValueError("LPIPS and adversarial terms need pretrained/extra weights not available here; "
                         "set lpips_weight = adv_weight = 0 (pixel + KL + equivariance objective)")
    print("train-vae: objective = pixel ({}) + KL ({}) + equivariance (p={}); LPIPS off (no VGG weights), "
          "adversarial off".format(config.pixel_loss, config.kl_weight, config.p_eq), flush=True)
    ray.data.DataContext.get_current().enable_progress_bars = False  # before any dataset: the log lines say more
    fs, root = resolve(config.input, config.s3)
    _, units = list_units(fs, root, config.input_format)
    if not units:
        raise FileNotFoundError(f"no images under {config.input}")
    error_log = ErrorLog.remote()
    size = config.image_size or config.crop_size
    ds = ray.data.from_items([u.__dict__ for u in units])
    ds = ds.map_batches(ReadStage(fs, [size], {size: set()}), batch_format="pyarrow", batch_size=8, num_cpus=0.5)
    ds = ds.map_batches(PrepareStage(TransformSpec(max_aspect=4.0), config.max_pixels, want_thumbnail=False),
                        batch_format="pyarrow", batch_size=4, num_cpus=0.5)
    ds = ds.map_batches(KeepImages(error_log), batch_format="pyarrow", batch_size=16, num_cpus=0.5)
    held_out = ds.filter(lambda row: is_held_out(row["key"])).take(config.eval_images)
    if not held_out:
        raise ValueError("no held-out image (one key in eight is held out): the input has too few usable images")
    eval_images = to_images({k: [r[k] for r in held_out] for k in ("pixels", "h", "w")}, config.crop_size,
                            None).numpy()
    train_ds = ds.filter(lambda row: not is_held_out(row["key"]))

    tracking_uri = config.tracking.resolved_uri()
    run = StageRun.open(tracking_uri=tracking_uri, experiment=config.tracking.experiment,
                        stage_key=config.tracking.stage_key or f"train-vae:{config.output}",
                        run_name=config.tracking.run_name or "train-vae",
                        parent_run_id=config.tracking.parent_run_id, tags={"hdm.stage": "train-vae",
                                                                           "hdm.input": config.input})
    run.log_params(config.model_dump(mode="json"))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config.model_dump(mode="json"), "eval": eval_images, "run_id": run.run_id,
                           "tracking_uri": tracking_uri, "output": config.output,
                           "s3": config.s3.model_dump(mode="json")},
        scaling_config=scaling(config.workers, config.use_gpu),
        run_config=RunConfig(name="train-vae", storage_path=tempfile.mkdtemp(prefix="hdm-vae-")),
        datasets={"train": train_ds}, dataset_config=DataConfig(datasets_to_split=["train"]))
    try:
        result = trainer.fit()
    except Exception:
        run.finish("FAILED")
        raise
    summary = VAETrainSummary(output=config.output, metrics=dict(result.metrics),
                              errors=ray.get(error_log.counts.remote()), run_id=run.run_id)
    run.log_metrics({f"input_errors/{k}": v for k, v in summary.errors.items()}, step=0)
    run.set_tags({"hdm.output": config.output})
    run.finish()
    return summary
