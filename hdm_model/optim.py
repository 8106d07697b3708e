"""Optimisation as in the released recipe (hdm_spec 5): per-tensor lr = base / fan_in, AdamW with weight
decay on every tensor, linear warm-up then cosine down to 1% of the peak."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn


def fan_in(param: torch.Tensor) -> int:
    """numel for vectors, in_features for matrices, prod(shape[1:]) for higher ranks."""
    if param.ndim < 2:
        return param.numel()
    return math.prod(param.shape[1:])


def mup_param_groups(model: nn.Module, base_lr: float, *, weight_decay: float) -> list[dict]:
    """Parameter groups with lr = base_lr / fan_in. Tensors of equal fan-in share a group (same maths as
    one group per tensor, far fewer groups); each group lists its tensors' names under "names"."""
    by_fan_in: dict[int, list[tuple[str, nn.Parameter]]] = defaultdict(list)
    for name, param in model.named_parameters():
        if param.requires_grad:
            by_fan_in[fan_in(param)].append((name, param))
    return [
        {"params": [p for _, p in named], "names": [n for n, _ in named], "lr": base_lr / fan,
         "weight_decay": weight_decay, "fan_in": fan}
        for fan, named in sorted(by_fan_in.items())
    ]


def build_optimizer(model: nn.Module, *, base_lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `mup_param_groups`; decoupled decay on every tensor (norms, biases, RoPE included).

    fused None: the fused kernel whenever every parameter is a float tensor on CPU or CUDA (same maths,
    about 4x faster than the for-each kernel on CPU); build the optimizer after moving the model.
    """
    if fused is None:
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW(mup_param_groups(model, base_lr, weight_decay=weight_decay),
                             lr=base_lr, betas=betas, eps=eps, fused=fused)


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int = 1000, final_ratio: float = 0.01) -> float:
    """s / warmup during warm-up, then final + (1 - final) * (1 + cos(pi * progress)) / 2."""
    if step < warmup_steps:
        return step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 1000,
                           final_ratio: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimizer-step schedule that scales every group's own lr by `lr_multiplier`."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps=total_steps, warmup_steps=warmup_steps,
                                           final_ratio=final_ratio))
