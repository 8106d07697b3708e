"""The training step on its own (pipelines/train/step.py): accumulation, loss weights, seeded draws and the
optimizer step, against the same sums written out by hand."""

from __future__ import annotations

import copy

import pytest
import torch

from hdm_model import build_optimizer, flow_matching_loss, warmup_cosine_schedule
from pipelines.train.batches import MicroBatch, blank_batch, step_generator
from pipelines.train.config import TrainStageConfig
from pipelines.train.step import TrainStep, apply_gradients, build_model

SIDE, CTX = 4, 32  # 32 px latents (4x4x4), text states of width 32


def _config(**overrides) -> TrainStageConfig:
    fields = dict(res=32, latents="unused", storage="unused", model="tiny", steps=10, warmup_steps=0, batch_size=2,
                  grad_accum=1, tread_rate=0.5, checkpointing="none", seed=7)
    return TrainStageConfig(**{**fields, **overrides})


def _encode(captions: list[str]) -> torch.Tensor:
    """Text states that depend on the caption alone (3 tokens of width CTX)."""
    return torch.stack([torch.full((3, CTX), float(len(c))) for c in captions])


def _encode_batch(batch: MicroBatch) -> torch.Tensor:
    return _encode(batch.captions)


def _batch(size: int, seed: int) -> MicroBatch:
    from hdm_model import crop_latent

    _, pos = crop_latent(torch.zeros(4, SIDE, SIDE), offset=(0, 0))
    z0 = torch.randn(size, 4, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))
    return MicroBatch(latents=z0, positions=pos.repeat(size, 1, 1), aspect=torch.zeros(size),
                      captions=["a" * (i % 3) for i in range(size)], keys=[f"k{seed}-{i}" for i in range(size)])


def _step(cfg: TrainStageConfig) -> TrainStep:
    torch.manual_seed(0)
    model = build_model(cfg, ctx_dim=CTX, device=torch.device("cpu")).train()
    return TrainStep.for_stage(cfg, model, encode_text=_encode_batch, device=torch.device("cpu"))


def _loss(model, batch: MicroBatch, *, seed: int, step: int, micro: int) -> torch.Tensor:
    """The flow-matching loss of `batch` with the draws of micro-step `micro` of optimizer step `step` (rank 0)."""
    draws = step_generator(seed=seed, rank=0, step=step, micro=micro, device=torch.device("cpu"))
    return flow_matching_loss(model, batch.latents, _encode(batch.captions), pos_map=batch.positions,
                              aspect=batch.aspect, generator=draws)


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_k_micro_steps_accumulate_the_gradient_of_the_mean_loss():
    """3 micro-batches of 2 accumulate the gradient of the mean of their 3 losses: that of one batch of 6
    (the loss is a mean over elements, the micro-batches equal in size) drawn as the 3 micro-steps draw."""
    k, cfg = 3, _config(grad_accum=3)
    step, batches = _step(cfg), [_batch(2, seed) for seed in range(k)]
    reference = copy.deepcopy(step.net)
    assert [step.micro_step(b) for b in batches] == [False, False, True]
    (sum(_loss(reference, b, seed=cfg.seed, step=0, micro=i) for i, b in enumerate(batches)) / k).backward()
    got, want = _grads(step.net), _grads(reference)
    assert got.keys() == want.keys() and len(got) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_step_loss_is_the_mean_of_its_micro_batch_losses_with_the_seeded_draws():
    cfg = _config(grad_accum=2)
    step, batches = _step(cfg), [_batch(2, 0), _batch(2, 1)]
    reference = copy.deepcopy(step.net)
    with torch.no_grad():
        want = [_loss(reference, b, seed=cfg.seed, step=0, micro=i).item() for i, b in enumerate(batches)]
    for b in batches:
        step.micro_step(b)
    stats = step.optimizer_step()
    assert float(stats.loss) == pytest.approx(sum(want) / 2, rel=1e-6) and step.step == 1 and step.micro == 0
    with torch.no_grad():  # the next step draws with step = 1
        next_loss = _loss(step.net, batches[0], seed=cfg.seed, step=1, micro=0).item()
    assert step.micro_step(batches[0]) is False
    assert step.loss_count == 1 and float(step.loss_sum) == pytest.approx(next_loss, rel=1e-6)


def test_a_blank_batch_of_weight_zero_contributes_nothing():
    """A rank out of data in a resumed epoch trains a blank batch with weight 0: no gradient, no loss."""
    cfg = _config(grad_accum=2)
    step, real = _step(cfg), _batch(2, 0)
    reference = copy.deepcopy(step.net)
    step.micro_step(real, weight=1.0)
    step.micro_step(blank_batch(channels=4, side=SIDE), weight=0.0)
    (_loss(reference, real, seed=cfg.seed, step=0, micro=0) / 2).backward()
    for name, grad in _grads(reference).items():
        torch.testing.assert_close(_grads(step.net)[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert step.loss_count == 1
    alone = _step(_config())
    alone.micro_step(_batch(2, 0), weight=0.0)
    assert all(not p.grad.any() for p in alone.net.parameters() if p.grad is not None)
    assert alone.optimizer_step().loss is None  # the meter then records no loss for this rank


def test_a_loss_weight_scales_the_gradient():
    cfg = _config()
    plain, weighted = _step(cfg), _step(cfg)
    plain.micro_step(_batch(2, 0))
    weighted.micro_step(_batch(2, 0), weight=2.5)
    for name, grad in _grads(plain.net).items():
        torch.testing.assert_close(_grads(weighted.net)[name], 2.5 * grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_optimizer_step_is_clip_adamw_schedule_zero_grad_and_ema():
    cfg = _config(grad_clip=1e-3, ema_decay=0.9)  # a clip this small binds
    step = _step(cfg)
    net = copy.deepcopy(step.net)  # the same step written out by hand
    optimizer = build_optimizer(net, base_lr=cfg.base_lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    scheduler = warmup_cosine_schedule(optimizer, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps)
    shadow = {k: v.detach().float().clone() for k, v in net.state_dict().items()}
    step.micro_step(_batch(2, 0))
    stats = step.optimizer_step()
    _loss(net, _batch(2, 0), seed=cfg.seed, step=0, micro=0).backward()
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    assert float(stats.grad_norm) == pytest.approx(float(norm), rel=1e-5) and stats.grad_norm > cfg.grad_clip
    assert all(p.grad is None for p in step.net.parameters())  # zeroed, set to None
    assert step.scheduler.last_epoch == 1 and step.step == 1
    for name, value in net.state_dict().items():
        torch.testing.assert_close(step.net.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(step.ema.shadow[name], 0.9 * shadow[name] + 0.1 * step.net.state_dict()[name],
                                   rtol=1e-6, atol=1e-7, msg=name)


def test_apply_gradients_clips_to_the_global_norm_and_returns_it_unclipped():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    model.weight.grad = torch.tensor([[3.0, 4.0]])  # norm 5
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    norm = apply_gradients(model.parameters(), optimizer, grad_clip=1.0)
    assert float(norm) == 5.0 and model.weight.grad is None
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[-0.6, -0.8]]))  # -grad * 1 / 5


def test_a_micro_step_never_reads_a_device_value(monkeypatch):
    """No host sync per micro-step: nothing in the forward and backward reads a tensor's value (item, float,
    bool, int; on a GPU each would wait for it), and a NaN loss raises nothing until the meter reads it."""
    step = _step(_config(grad_accum=2))
    reads = []
    for name in ("item", "__float__", "__bool__", "__int__", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: reads.append(_n) or _o(self, *a))
    poisoned = _batch(2, 1)
    poisoned.latents[0, 0, 0, 0] = float("nan")
    step.micro_step(_batch(2, 0))
    step.micro_step(poisoned)
    monkeypatch.undo()
    assert reads == []
    stats = step.optimizer_step()
    assert isinstance(stats.loss, torch.Tensor) and isinstance(stats.grad_norm, torch.Tensor)
    assert not torch.isfinite(stats.loss)
