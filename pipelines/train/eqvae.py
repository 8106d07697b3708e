"""EQ-VAE fine-tuning (or training from scratch) on Ray Train (eqvae_spec.md).

    images (the precompute job's readers) -> decode, resize short side to S (Ray Data tasks)
      -> Ray Train workers (DDP; gloo on CPU): random S x S crops + flips, EQ-VAE objective, AdamW (and an
         EMA of the weights, which then replaces them)
      -> rank 0: held-out PSNR and equivariance error before/after, reconstruction grids (MLflow),
         per-channel latent mean/std written into the config, save_pretrained to the output URI.

Bad inputs become rows of an error log (an actor, counted once per key), never training samples.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from pipelines import progress
from pipelines.cluster import epoch_batches, scaling
from pipelines.config import S3Options
from pipelines.data.images import TransformSpec
from pipelines.data.sources import list_units
from pipelines.data.stages import PrepareStage, ReadStage
from pipelines.storage import resolve, upload
from pipelines.tracking import INPUT_TAG, STAGE_TAG, STAGE_VAE, VAE_OUTPUT_TAG, StageRun
from pipelines.train.config import VAETrainConfig
from pipelines.train.harness import WorkerContext, fit, quiet_progress_bars, seed_init
from pipelines.train.step import EMA, apply_gradients, unwrap

FIXED_TRANSFORMS = [(0.5, 0), (0.75, 1), (1.0, 1), (1.0, 2), (0.625, 3)]  # (scale, quarter turns) for eval


@ray.remote(num_cpus=0)
class ErrorLog:
    """Rejected inputs' reason codes (pipelines.data.latent_store.ReasonCode), once per key however many
    epochs re-read them."""

    def __init__(self):
        self.codes: dict[str, str] = {}

    def record(self, rows: list[dict]) -> None:
        for row in rows:
            self.codes.setdefault(row["key"], row["reason_code"])

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.codes.values()))


@dataclass
class KeepImages:
    """Items -> (key, pixels, h, w) rows; error rows go to the error log."""

    error_log: Any

    def __call__(self, batch: pa.Table) -> pa.Table:
        errors = batch.filter(pc.equal(batch["kind"], "error"))
        if errors.num_rows:
            self.error_log.record.remote(errors.select(["key", "reason_code"]).to_pylist())
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


def training_images(batch: dict[str, np.ndarray], cfg: VAETrainConfig, rng: np.random.Generator, *,
                    step: int) -> torch.Tensor:
    """Step `step`'s images: augmented crops, or on every `whole_image_every`-th step whole images (a flip half
    the time), as many as hold the crops' pixels. A VAE that saw only crops meets a larger latent grid at full
    size than it trained on (8 x 8 against 4 x 4 in the demo): the demo's reconstructed every colour right at
    32 px and whole colours in wrong hues at 64 px until it saw whole images too (benchmarks/RESULTS.md)."""
    size = cfg.image_size or cfg.crop_size
    if cfg.whole_image_every and step % cfg.whole_image_every == 0:
        n = max(1, cfg.batch_size * cfg.crop_size ** 2 // size ** 2)
        return to_images({key: column[:n] for key, column in batch.items()}, size, rng)
    return to_images(batch, cfg.crop_size, rng, cfg.min_scale)


class EQObjective(torch.nn.Module):
    """The EQ-VAE loss as a module, so DDP sees a forward pass and all-reduces the gradients."""

    def __init__(self, vae, eq_config, train_encoder: bool):
        super().__init__()
        self.vae, self.eq_config, self.train_encoder = vae, eq_config, train_encoder

    def forward(self, x: torch.Tensor, generator: torch.Generator):
        from hdm_model.eqvae import eq_vae_loss

        return eq_vae_loss(self.vae, x, self.eq_config, generator=generator, train_encoder=self.train_encoder)


def train_loop(loop_config: dict) -> None:
    """One Ray Train worker: held-out metrics before (rank 0), training, the latent statistics (every rank),
    metrics after and the saved VAE (rank 0), then a report of them all."""
    cfg = VAETrainConfig.model_validate(loop_config["config"])
    worker = WorkerContext.start(torch_threads=cfg.torch_threads)
    job = VAEWorker(cfg, worker, run=worker.tracking_run(loop_config), held_out=loop_config["eval"])
    results: dict[str, float] = job.evaluate("before") if worker.is_chief else {}
    job.run.log_metrics(results, step=0)
    step = job.train()
    mean, std = job.latent_stats()
    if worker.is_chief:
        results.update(job.evaluate("after"))
        job.run.log_metrics(results, step=step)
        job.run.log_params({"latents_mean": mean, "latents_std": std})
        job.save(mean=mean, std=std, output=loop_config["output"], s3=S3Options.model_validate(loop_config["s3"]))
    job.run.close()  # the buffered metrics sent (waits out an MLflow outage, up to its patience)
    metrics = {**results, "step": step, "latents_mean": mean, "latents_std": std}
    # Ray Train keeps the metrics of reports with a checkpoint: rank 0 writes one holding just the metrics
    worker.report(metrics, write=lambda directory: (directory / "metrics.json").write_text(json.dumps(metrics)))


class VAEWorker:
    """The EQ-VAE job on one worker: the VAE (the parts `cfg.train` names trainable), its objective under DDP,
    AdamW, this rank's draws, and the held-out images rank 0 scores."""

    def __init__(self, cfg: VAETrainConfig, worker: WorkerContext, *, run: StageRun, held_out: np.ndarray):
        from hdm_model.eqvae import EQConfig, build_vae

        self.cfg, self.worker, self.run, device = cfg, worker, run, worker.device
        seed_init(cfg.seed)  # identical initial weights on every rank
        vae = build_vae(cfg.vae)
        vae.encoder.requires_grad_(cfg.train != "decoder")
        vae.quant_conv.requires_grad_(cfg.train != "decoder")
        vae.decoder.requires_grad_(cfg.train != "encoder")
        vae.post_quant_conv.requires_grad_(cfg.train != "encoder")
        eq = EQConfig(p_eq=cfg.p_eq, kl_weight=cfg.kl_weight, pixel_loss=cfg.pixel_loss,
                      lpips_weight=cfg.lpips_weight, adv_weight=cfg.adv_weight)
        self.objective = worker.prepare_model(EQObjective(vae, eq, cfg.train != "decoder"))
        self.vae = unwrap(self.objective).vae
        self.params = [p for p in self.vae.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.ema = EMA(self.vae, cfg.ema_decay) if cfg.ema_decay else None
        self.held_out = torch.from_numpy(held_out).to(device)
        self.shard = worker.dataset_shard("train")
        # this rank's draws: crops and flips (numpy), the objective's transforms and posterior samples (torch)
        self.rng = np.random.default_rng(cfg.seed + 1000 * worker.rank)
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed + worker.rank)

    def evaluate(self, tag: str) -> dict[str, float]:
        """Held-out PSNR and equivariance error as `tag`/..., and a reconstruction grid."""
        from hdm_model.eqvae import Transform, equivariance_error, psnr, reconstruct

        vae, held_out = self.vae, self.held_out
        vae.eval()
        recon = reconstruct(vae, held_out)
        transforms = [Transform(scale=s, k=k) for s, k in FIXED_TRANSFORMS]
        metrics = {f"{tag}/psnr": psnr(recon, held_out),
                   f"{tag}/eq_error": equivariance_error(vae, held_out, transforms)}
        vae.train()
        self.run.log_image(_grid(held_out, recon), f"reconstructions/{tag}.png")
        return metrics

    def train(self) -> int:
        """`cfg.steps` optimizer steps, epoch after epoch; the steps done."""
        cfg, step, epoch = self.cfg, 0, 0
        self.start = time.monotonic()
        while step < cfg.steps:
            seen, epoch = 0, epoch + 1
            # a new order every epoch (seeded): a small set otherwise repeats the same batches in the same order
            for batch in epoch_batches(self.shard, batch_size=cfg.batch_size, shuffle_buffer=cfg.shuffle_buffer,
                                       seed=cfg.seed + 1000 * self.worker.rank + epoch):
                seen, step = seen + 1, step + 1
                self.train_step(batch, step=step)
                if step >= cfg.steps:
                    break
            if seen == 0:
                raise RuntimeError(f"no training batch of {cfg.batch_size} images per worker: too few usable inputs")
        if self.ema is not None:  # from here on (metrics, latent statistics, the saved VAE) the average is the VAE
            self.vae.load_state_dict(self.ema.shadow)
        return step

    def train_step(self, batch: dict[str, np.ndarray], *, step: int) -> None:
        """Augmented crops -> EQ-VAE loss -> backward -> clipped AdamW step (logged when due)."""
        cfg = self.cfg
        x = training_images(batch, cfg, self.rng, step=step).to(self.worker.device)
        loss, parts = self.objective(x, self.gen)
        loss.backward()
        grad_norm = apply_gradients(self.params, self.opt, grad_clip=cfg.grad_clip)
        if self.ema is not None:
            self.ema.update(self.vae)
        if step % cfg.log_every == 0 or step == cfg.steps:
            self.run.log_metrics({**{f"train/{k}": v for k, v in parts.items()},
                                  "train/grad_norm": float(grad_norm)}, step=step)
            if self.worker.is_chief:
                elapsed = time.monotonic() - self.start
                print(f"[train-vae] step {step}/{cfg.steps} loss {loss.item():.4f} "
                      f"{step / elapsed:.1f} steps/s ETA {(cfg.steps - step) * elapsed / step / 60:.1f} min",
                      flush=True)
                progress.emit(done=step, total=cfg.steps, unit="step", rate=step / elapsed,
                              note=f"loss {loss.item():.4f}")

    def latent_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel latent mean and std over `cfg.stats_images` images of every worker (a collective)."""
        from hdm_model.eqvae import LatentMoments

        cfg, device = self.cfg, self.worker.device
        moments = LatentMoments(channels=self.vae.config.latent_channels)
        with torch.no_grad():
            self.vae.eval()
            for i, batch in enumerate(self.shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy")):
                if i * cfg.batch_size * self.worker.world >= cfg.stats_images:
                    break
                x = to_images(batch, cfg.crop_size, None).to(device)
                moments.update(self.vae.encode(x).latent_dist.sample(self.gen))
        return _all_reduce(moments, device).mean_std()

    def save(self, *, mean: list[float], std: list[float], output: str, s3: S3Options) -> None:
        """The VAE with its latent statistics in its config, saved (save_pretrained) to `output`."""
        from hdm_model.eqvae import set_latent_stats

        set_latent_stats(self.vae, mean, std)
        with tempfile.TemporaryDirectory() as tmp:
            self.vae.save_pretrained(tmp)
            upload(tmp, output, s3)


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

    if config.lpips_weight or config.adv_weight:
        raise ValueError("LPIPS and adversarial terms need pretrained/extra weights not available here; "
                         "set lpips_weight = adv_weight = 0 (pixel + KL + equivariance objective)")
    print("train-vae: objective = pixel ({}) + KL ({}) + equivariance (p={}); LPIPS off (no VGG weights), "
          "adversarial off".format(config.pixel_loss, config.kl_weight, config.p_eq), flush=True)
    quiet_progress_bars()
    error_log = ErrorLog.remote()
    train_ds, eval_images = _images(config, error_log)
    run = StageRun.for_job(config.tracking, default_key=f"train-vae:{config.output}", default_name="train-vae",
                           tags={STAGE_TAG: STAGE_VAE, INPUT_TAG: config.input})
    with run.ending_on_error():  # FAILED on an error, KILLED when the job is stopped: never left RUNNING
        run.log_params(config.model_dump(mode="json"))
        result = fit(train_loop, run=run, tracking_uri=config.tracking.resolved_uri(), loop_config={
            "config": config.model_dump(mode="json"), "eval": eval_images, "output": config.output,
            "s3": config.s3.model_dump(mode="json")},
            scaling_config=scaling(config.workers, config.use_gpu),
            run_config=RunConfig(name="train-vae", storage_path=tempfile.mkdtemp(prefix="hdm-vae-")),
            datasets={"train": train_ds}, dataset_config=DataConfig(datasets_to_split=["train"]))
        summary = VAETrainSummary(output=config.output, metrics=dict(result.metrics),
                                  errors=ray.get(error_log.counts.remote()), run_id=run.run_id)
        run.log_metrics({f"input_errors/{k}": v for k, v in summary.errors.items()}, step=0)
        run.set_tags({VAE_OUTPUT_TAG: config.output})
    run.finish()
    return summary


def _images(config: VAETrainConfig, error_log) -> tuple[ray.data.Dataset, np.ndarray]:
    """(training images, held-out centre crops (N, 3, S, S)) of the job's input: decoded and resized by Ray
    Data tasks, rejected inputs sent to `error_log`; one key in eight held out."""
    fs, root = resolve(config.input, config.s3)
    _, units = list_units(fs, root, config.input_format)
    if not units:
        raise FileNotFoundError(f"no images under {config.input}")
    size = config.image_size or config.crop_size
    ds = ray.data.from_items([u.__dict__ for u in units])
    ds = ds.map_batches(ReadStage(fs, [size], {size: {}}), batch_format="pyarrow", batch_size=8, num_cpus=0.5)
    ds = ds.map_batches(PrepareStage(TransformSpec(max_aspect=4.0), config.max_pixels, want_thumbnail=False),
                        batch_format="pyarrow", batch_size=4, num_cpus=0.5)
    ds = ds.map_batches(KeepImages(error_log), batch_format="pyarrow", batch_size=16, num_cpus=0.5)
    held_out = ds.filter(lambda row: is_held_out(row["key"])).take(config.eval_images)
    if not held_out:
        raise ValueError("no held-out image (one key in eight is held out): the input has too few usable images")
    eval_images = to_images({k: [r[k] for r in held_out] for k in ("pixels", "h", "w")}, config.crop_size,
                            None).numpy()
    return ds.filter(lambda row: not is_held_out(row["key"])), eval_images
