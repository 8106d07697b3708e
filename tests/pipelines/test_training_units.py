"""Parts of the training worker on their own: EMA maths and its checkpoint round trip, the batch prefetcher."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from hdm_model import build_denoiser, build_optimizer, warmup_cosine_schedule
from pipelines.cluster import cpu_threads, set_train_threads
from pipelines.configs import StageConfig
from pipelines.training import EMA, EMA_NAME, END_OF_EPOCH, BatchPrefetcher, _restore, save_checkpoint


def _set_weights(model: torch.nn.Module, value: torch.Tensor) -> None:
    with torch.no_grad():
        model.weight.copy_(value)
        model.bias.fill_(float(value.mean()))


def test_cpu_workers_share_the_node_cores_as_torch_threads(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert [cpu_threads(n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    assert cpu_threads(2, threads=3) == 3  # an explicit count wins
    assert [cpu_threads(n, leave=1) for n in (1, 2, 8)] == [7, 3, 1]  # training leaves a core to Ray
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert cpu_threads(1, leave=1) == 1
    before = torch.get_num_threads()
    try:
        set_train_threads(torch.device("cpu"), 1, None)
        assert torch.get_num_threads() == 1
        set_train_threads(torch.device("cpu"), 1, 2)  # torch_threads wins
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_ema_after_k_updates_is_the_closed_form():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    decay, k = 0.9, 5
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    ema = EMA(model, decay)
    seen = [torch.randn(2, 3) for _ in range(k)]
    for w in seen:
        _set_weights(model, w)
        ema.update(model)
    # shadow_k = d^k w_0 + sum_i (1 - d) d^(k - i) w_i
    expected_w = decay**k * w0 + sum((1 - decay) * decay ** (k - i) * w for i, w in enumerate(seen, 1))
    expected_b = decay**k * b0 + sum((1 - decay) * decay ** (k - i) * w.mean() for i, w in enumerate(seen, 1))
    torch.testing.assert_close(ema.shadow["weight"], expected_w)
    torch.testing.assert_close(ema.shadow["bias"], expected_b)
    assert not torch.allclose(ema.shadow["weight"], model.weight)  # an average, not a copy


def test_ema_applied_swaps_weights_in_and_back():
    model = torch.nn.Linear(3, 2)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    ema = EMA(model, 0.5)
    _set_weights(model, torch.ones(2, 3))
    ema.update(model)
    with ema.applied(model) as weights:
        assert weights is model
        torch.testing.assert_close(model.weight, 0.5 * own["weight"] + 0.5)
    torch.testing.assert_close(model.weight, torch.ones(2, 3))


def _stage(tmp_path, **overrides) -> StageConfig:
    return StageConfig(res=32, latents=str(tmp_path / "latents"), storage=str(tmp_path / "runs"), model="tiny",
                       steps=10, warmup_steps=2, **overrides)


def _trained(cfg: StageConfig, steps: int):
    torch.manual_seed(0)
    net = build_denoiser(cfg.model, ctx_dim=32)
    optimizer = build_optimizer(net, base_lr=cfg.base_lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    scheduler = warmup_cosine_schedule(optimizer, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps)
    ema = EMA(net, cfg.ema_decay) if cfg.ema_decay else None
    for _ in range(steps):
        net(torch.randn(2, 4, 4, 4), torch.rand(2), torch.randn(2, 3, 32)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if ema is not None:
            ema.update(net)
    return net, optimizer, scheduler, ema


def test_checkpoint_saves_and_restores_ema_weights(tmp_path):
    cfg = _stage(tmp_path, ema_decay=0.8)
    net, optimizer, scheduler, ema = _trained(cfg, steps=3)
    save_checkpoint(tmp_path, model=net, cfg=cfg, vae="v", optimizer=optimizer, scheduler=scheduler, ema=ema,
                    progress={"step": 3, "epoch": 1, "batch_in_epoch": 2}, rng={"torch": torch.get_rng_state()})
    saved = load_file(tmp_path / EMA_NAME)
    assert saved.keys() == dict(net.state_dict()).keys()
    assert not torch.equal(saved["unpatch.weight"], net.state_dict()["unpatch.weight"])  # EMA, not the weights

    fresh, fresh_opt, fresh_sched, fresh_ema = _trained(cfg, steps=0)
    progress = _restore(tmp_path, fresh, fresh_opt, fresh_sched, fresh_ema)
    assert progress == {"step": 3, "epoch": 1, "batch_in_epoch": 2}
    for name, value in ema.shadow.items():
        torch.testing.assert_close(fresh_ema.shadow[name], value, rtol=0, atol=0)
        torch.testing.assert_close(fresh.state_dict()[name], net.state_dict()[name], rtol=0, atol=0)


def test_ema_turned_on_at_resume_starts_from_the_restored_weights(tmp_path):
    net, optimizer, scheduler, _ = _trained(_stage(tmp_path), steps=2)
    cfg = _stage(tmp_path, ema_decay=0.9)
    save_checkpoint(tmp_path, model=net, cfg=cfg, vae="v", optimizer=optimizer, scheduler=scheduler, ema=None,
                    progress={"step": 2, "epoch": 0, "batch_in_epoch": 2}, rng={"torch": torch.get_rng_state()})
    assert not (tmp_path / EMA_NAME).exists()
    fresh, fresh_opt, fresh_sched, fresh_ema = _trained(cfg, steps=0)
    _restore(tmp_path, fresh, fresh_opt, fresh_sched, fresh_ema)
    for name, value in net.state_dict().items():
        torch.testing.assert_close(fresh_ema.shadow[name], value, rtol=0, atol=0)


@pytest.mark.integration
def test_prefetcher_crosses_epochs_skips_on_resume_and_raises_errors(ray_driver):
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # batches in row order
    shard = ray.data.from_items([{"id": i} for i in range(10)]).streaming_split(1, equal=True)[0]
    data = BatchPrefetcher(shard, lambda batch: batch["id"].tolist(), batch_size=3, skip=2)
    items = [data.next() for _ in range(6)]
    data.close(wait_s=30)  # no Ray call of its thread may outlive the module's ray.shutdown()
    # 3 full batches per epoch (drop_last); resuming after the 2nd batch of an epoch yields its 3rd first.
    assert items == [[6, 7, 8], END_OF_EPOCH, [0, 1, 2], [3, 4, 5], [6, 7, 8], END_OF_EPOCH]

    small = ray.data.from_items([{"id": i} for i in range(2)]).streaming_split(1, equal=True)[0]
    with pytest.raises(RuntimeError, match="no batch of 3 latents"):
        BatchPrefetcher(small, lambda batch: batch, batch_size=3).next()


def test_sampling_a_checkpoint_uses_its_ema_weights(tmp_path):
    from safetensors.torch import save_file

    from hdm_model.pipeline import EMA_WEIGHTS_NAME, load_checkpoint_denoiser

    model = build_denoiser("tiny")
    model.save_pretrained(tmp_path)
    shadow = {k: torch.full_like(v, 0.25) for k, v in model.state_dict().items()}
    save_file(shadow, tmp_path / EMA_WEIGHTS_NAME)
    with_ema = load_checkpoint_denoiser(tmp_path, ema=True).state_dict()
    trained = load_checkpoint_denoiser(tmp_path, ema=False).state_dict()
    assert all(torch.equal(with_ema[k], shadow[k]) for k in shadow)
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())


@pytest.mark.integration
def test_prefetcher_shuffles_each_epoch_anew_and_resumes_the_same_order(ray_driver):
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True

    def epochs(n: int, **kwargs) -> list[list[list[int]]]:  # a fresh shard each time, as a restarted worker
        shard = ray.data.from_items([{"id": i} for i in range(12)]).streaming_split(1, equal=True)[0]
        data = BatchPrefetcher(shard, lambda batch: batch["id"].tolist(), batch_size=3, shuffle_buffer=12, seed=5,
                               **kwargs)
        out, current = [], []
        while len(out) < n:
            item = data.next()
            if item is END_OF_EPOCH:
                out, current = out + [current], []
            else:
                current.append(item)
        data.close(wait_s=30)
        return out

    first, second = epochs(2)
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(12))  # every row once per epoch
    assert first != second and sum(first, []) != list(range(12))  # shuffled, and anew each epoch
    (resumed,) = epochs(1, epoch=1, skip=1)  # a run stopped after the 1st batch of its 2nd epoch
    assert resumed == second[1:]
