"""One training step of the denoiser: what a training stage's worker runs (pipelines/train/worker.py) and
what the GPU benchmark times (benchmarks/gpu_check.py), the same object in both.

A step is `grad_accum` micro-steps (text encoding, flow-matching loss under bf16 autocast on CUDA, backward
scaled by 1 / grad_accum and by the batch's loss weight; DDP's gradient all-reduce only on the last one),
then the optimizer step: clip, AdamW, schedule, zero the gradients, EMA.

Nothing in a step waits for the GPU: the batch's tensors (pinned by the prefetch thread) are copied with
`non_blocking=True`, the loss is summed on the device and the gradient norm stays a device tensor. They are
read, and checked finite, only when the meter logs them (pipelines/train/meter.py).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from hdm_model import checkpoint

from pipelines.train.batches import MicroBatch, step_generator
from pipelines.train.config import TrainStageConfig


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def build_model(cfg: TrainStageConfig, *, ctx_dim: int, device: torch.device) -> torch.nn.Module:
    """The stage's denoiser, freshly initialised from torch's global RNG: its preset and runtime options,
    compiled as `cfg.compile` says for `device` (before any DDP wrap; compilation itself waits for the first
    forward)."""
    from hdm_model import build_denoiser
    from hdm_model.compile import compile_denoiser, resolve_compile

    model = build_denoiser(cfg.model, ctx_dim=ctx_dim, tread_rate=cfg.tread_rate, checkpointing=cfg.checkpointing,
                           attn_kernel=cfg.attn_kernel)
    return compile_denoiser(model, resolve_compile(cfg.compile, device))


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
        state = model.state_dict()  # one fused lerp over every tensor, not a kernel launch per tensor
        torch._foreach_lerp_([self.shadow[k] for k in state], [v.float() for v in state.values()], 1 - self.decay)

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


def apply_gradients(parameters: Iterable[torch.nn.Parameter], optimizer: torch.optim.Optimizer, *,
                    grad_clip: float, scheduler=None) -> torch.Tensor:
    """Clip the gradients to a global norm of `grad_clip`, step the optimizer (and its schedule), zero the
    gradients: the end of every training step, the denoiser's and the EQ-VAE's. The norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


@dataclass(frozen=True)
class StepStats:
    """Device tensors, read when logged (reading one waits for the GPU)."""

    loss: torch.Tensor | None  # mean over this rank's weighted micro-batches; None when all were blank (weight 0)
    grad_norm: torch.Tensor  # before clipping


class TrainStep:
    """The denoiser's training step, micro-step by micro-step.

    `encode_text(batch)` gives the (B, T, D) text states of a MicroBatch's captions, on the device. Every draw of a micro-step
    (timesteps, noise, TREAD mask) comes from `step_generator(seed, rank, step, micro)`, so ranks draw
    differently and a run resumed at `step` draws what the uninterrupted run drew.
    """

    def __init__(self, model: torch.nn.Module, *, encode_text: Callable[[MicroBatch], torch.Tensor], optimizer,
                 scheduler, grad_accum: int, grad_clip: float, ema: EMA | None, device: torch.device, seed: int,
                 rank: int = 0, world: int = 1):
        self.model, self.net = model, unwrap(model)
        self.encode_text, self.optimizer, self.scheduler, self.ema = encode_text, optimizer, scheduler, ema
        self.grad_accum, self.grad_clip, self.device = grad_accum, grad_clip, device
        self.seed, self.rank, self.world = seed, rank, world
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        self.step = 0  # optimizer steps done (set by a resume)
        self.micro = 0  # micro-step within the optimizer step
        self.loss_sum: torch.Tensor | None = None  # of this rank's weighted micro-batches in the step, on device
        self.loss_count = 0

    @classmethod
    def for_stage(cls, cfg: TrainStageConfig, model: torch.nn.Module, *, encode_text, device: torch.device,
                  rank: int = 0, world: int = 1) -> TrainStep:
        """The step of a training stage: muP AdamW, warm-up + cosine over `cfg.steps`, EMA when configured."""
        from hdm_model import build_optimizer, warmup_cosine_schedule

        net = unwrap(model)
        optimizer = build_optimizer(net, base_lr=cfg.base_lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
        scheduler = warmup_cosine_schedule(optimizer, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps)
        return cls(model, encode_text=encode_text, optimizer=optimizer, scheduler=scheduler,
                   grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
                   ema=EMA(net, cfg.ema_decay) if cfg.ema_decay else None, device=device, seed=cfg.seed,
                   rank=rank, world=world)

    def micro_step(self, batch: MicroBatch, *, weight: float = 1.0) -> bool:
        """Forward and backward of one micro-batch, its loss weighed by `weight` (0: a blank batch that only
        keeps DDP's ranks in step); True when it completes the accumulation."""
        from hdm_model import flow_matching_loss

        ctx_states = self.encode_text(batch)
        if self.device.type != "cuda":  # no autocast: the fp32 denoiser takes fp32 states (under autocast an
            ctx_states = ctx_states.float()  # fp32 copy of the bf16 states would be cast straight back)
        z0, pos, aspect = (t.to(self.device, non_blocking=True) for t in (batch.latents, batch.positions, batch.aspect))
        draws = step_generator(seed=self.seed, rank=self.rank, step=self.step, micro=self.micro, device=self.device)
        sync = self.micro + 1 == self.grad_accum  # DDP all-reduces the gradients on this backward only
        with (nullcontext() if sync or self.world == 1 else self.model.no_sync()), self.autocast:
            loss = flow_matching_loss(self.model, z0, ctx_states, pos_map=pos, aspect=aspect, generator=draws)
        (loss * weight / self.grad_accum).backward()
        self.micro = 0 if sync else self.micro + 1
        if weight > 0:
            loss = loss.detach()
            self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
            self.loss_count += 1
        return sync

    def optimizer_step(self) -> StepStats:
        """Clip, optimizer and schedule step, zero gradients, EMA update; the step's loss and gradient norm."""
        grad_norm = apply_gradients(self.net.parameters(), self.optimizer, grad_clip=self.grad_clip,
                                    scheduler=self.scheduler)
        if self.ema is not None:
            self.ema.update(self.net)
        self.step += 1
        loss = self.loss_sum / self.loss_count if self.loss_sum is not None else None
        self.loss_sum, self.loss_count = None, 0
        return StepStats(loss=loss, grad_norm=grad_norm.detach())
