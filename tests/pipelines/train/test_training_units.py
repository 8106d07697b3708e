"""Parts of the training worker on their own (pipelines/train/batches.py, step.py, worker.py): EMA maths and
its checkpoint round trip, the batch prefetcher, the seeded draws and the resume by keys."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hdm_model import build_denoiser, build_optimizer, warmup_cosine_schedule
from hdm_model.checkpoint import EMA_WEIGHTS, TRAINING_STATE
from pipelines.cluster import cpu_threads, set_train_threads
from pipelines.train.config import TrainStageConfig
from pipelines.train.batches import (END_OF_EPOCH, BatchPrefetcher, LatentBatcher, MicroBatch, ResumedEpoch,
                                     derive_seed, step_generator, without_keys)
from pipelines.train.step import EMA
from pipelines.train.worker import checkpoint_writer, restore_checkpoint, save_checkpoint


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


def _stage(tmp_path, **overrides) -> TrainStageConfig:
    return TrainStageConfig(res=32, latents=str(tmp_path / "latents"), storage=str(tmp_path / "runs"), model="tiny",
                       steps=10, warmup_steps=2, **overrides)


def _trained(cfg: TrainStageConfig, steps: int):
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
                    progress={"step": 3, "epoch": 1}, epoch_keys=["k2", "k0"])
    saved = load_file(tmp_path / EMA_WEIGHTS)
    assert saved.keys() == dict(net.state_dict()).keys()
    assert not torch.equal(saved["unpatch.weight"], net.state_dict()["unpatch.weight"])  # EMA, not the weights

    fresh, fresh_opt, fresh_sched, fresh_ema = _trained(cfg, steps=0)
    progress, done = restore_checkpoint(tmp_path, fresh, fresh_opt, fresh_sched, fresh_ema)
    assert progress == {"step": 3, "epoch": 1} and done == {"k0", "k2"}
    for name, value in ema.shadow.items():
        torch.testing.assert_close(fresh_ema.shadow[name], value, rtol=0, atol=0)
        torch.testing.assert_close(fresh.state_dict()[name], net.state_dict()[name], rtol=0, atol=0)


def test_a_checkpoint_holds_the_state_of_when_it_was_taken_not_of_when_it_is_written(tmp_path):
    """The writing runs while training goes on (Ray Train's upload thread): what is written is the state at
    the checkpoint's step, whatever the steps after it change in place (weights, EMA, optimizer moments)."""
    cfg = _stage(tmp_path, ema_decay=0.8)
    net, optimizer, scheduler, ema = _trained(cfg, steps=2)
    at_step_2 = {k: v.clone() for k, v in net.state_dict().items()}
    moment = next(iter(optimizer.state.values()))["exp_avg"].clone()
    write = checkpoint_writer(model=net, cfg=cfg, vae="v", optimizer=optimizer, scheduler=scheduler, ema=ema,
                              progress={"step": 2, "epoch": 0}, epoch_keys=["k1"])
    net(torch.randn(2, 4, 4, 4), torch.rand(2), torch.randn(2, 3, 32)).square().mean().backward()
    optimizer.step()  # in place: the live tensors move on
    ema.update(net)
    write(tmp_path / "ckpt")
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert any(not torch.equal(saved[k], v) for k, v in net.state_dict().items())
    for name, value in at_step_2.items():
        assert torch.equal(saved[name], value), name
    state = torch.load(tmp_path / "ckpt" / TRAINING_STATE, weights_only=True)
    assert torch.equal(next(iter(state["optimizer"]["state"].values()))["exp_avg"], moment)
    assert (state["step"], state["epoch_keys"]) == (2, ["k1"])


def test_ema_turned_on_at_resume_starts_from_the_restored_weights(tmp_path):
    net, optimizer, scheduler, _ = _trained(_stage(tmp_path), steps=2)
    cfg = _stage(tmp_path, ema_decay=0.9)
    save_checkpoint(tmp_path, model=net, cfg=cfg, vae="v", optimizer=optimizer, scheduler=scheduler, ema=None,
                    progress={"step": 2, "epoch": 0}, epoch_keys=[])
    assert not (tmp_path / EMA_WEIGHTS).exists()
    fresh, fresh_opt, fresh_sched, fresh_ema = _trained(cfg, steps=0)
    restore_checkpoint(tmp_path, fresh, fresh_opt, fresh_sched, fresh_ema)
    for name, value in net.state_dict().items():
        torch.testing.assert_close(fresh_ema.shadow[name], value, rtol=0, atol=0)


def _ids(batch, *, epoch):
    return epoch, batch["id"].tolist()


def _rows(ids) -> list[dict]:
    return [{"id": i, "key": f"k{i}"} for i in ids]


@pytest.mark.integration
def test_prefetcher_crosses_epochs_leaves_out_trained_keys_on_resume_and_raises_errors(ray_driver):
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # batches in row order
    shard = ray.data.from_items(_rows(range(10))).streaming_split(1, equal=True)[0]
    data = BatchPrefetcher(shard, _ids, batch_size=3, epoch=4, done_keys=frozenset({"k1", "k4", "k8"}))
    items = [data.next() for _ in range(6)]
    data.close(wait_s=30)  # no Ray call of its thread may outlive the module's ray.shutdown()
    # The resumed epoch regroups the 7 rows left into 2 batches (the 7th row is dropped); then 3 full batches
    # per epoch (drop_last), each batch told its epoch.
    assert items == [(4, [0, 2, 3]), (4, [5, 6, 7]), END_OF_EPOCH, (5, [0, 1, 2]), (5, [3, 4, 5]), (5, [6, 7, 8])]

    small = ray.data.from_items(_rows(range(2))).streaming_split(1, equal=True)[0]
    with pytest.raises(RuntimeError, match="no batch of 3 latents"):
        BatchPrefetcher(small, _ids, batch_size=3).next()
    done = ray.data.from_items(_rows(range(6))).streaming_split(1, equal=True)[0]
    data = BatchPrefetcher(done, _ids, batch_size=3, done_keys=frozenset(f"k{i}" for i in range(6)))
    assert [data.next(), data.next()] == [END_OF_EPOCH, (1, [0, 1, 2])]  # an epoch with every key trained
    data.close(wait_s=30)


def test_sampling_a_checkpoint_uses_its_ema_weights(tmp_path):
    from safetensors.torch import save_file

    from hdm_model.pipeline import load_checkpoint_denoiser

    model = build_denoiser("tiny")
    model.save_pretrained(tmp_path)
    shadow = {k: torch.full_like(v, 0.25) for k, v in model.state_dict().items()}
    save_file(shadow, tmp_path / EMA_WEIGHTS)
    with_ema = load_checkpoint_denoiser(tmp_path, ema=True).state_dict()
    trained = load_checkpoint_denoiser(tmp_path, ema=False).state_dict()
    assert all(torch.equal(with_ema[k], shadow[k]) for k in shadow)
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())


@pytest.mark.integration
def test_prefetcher_shuffles_each_epoch_anew_and_resumes_the_same_order(ray_driver):
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True

    def epochs(n: int, **kwargs) -> list[list[list[int]]]:  # a fresh shard each time, as a restarted worker
        shard = ray.data.from_items(_rows(range(12))).streaming_split(1, equal=True)[0]
        data = BatchPrefetcher(shard, lambda batch, epoch: batch["id"].tolist(), batch_size=3, shuffle_buffer=12,
                               seed=5, **kwargs)
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
    (resumed,) = epochs(1, epoch=1, done_keys=frozenset(f"k{i}" for i in second[0]))  # stopped after a batch
    assert resumed == second[1:]


def _latent_rows(keys: list[str], *, shape=(4, 4, 6)) -> dict[str, np.ndarray]:
    """Rows of the latent Parquet as the worker reads them: wide latents with a stored posterior std."""
    rng = np.random.default_rng(0)
    column = lambda values: np.array(values, dtype=object)  # noqa: E731
    return {"key": column(keys), "caption": column([f"caption {k}" for k in keys]),
            "latent": column([rng.normal(size=shape).astype(np.float16).tobytes() for _ in keys]),
            "latent_shape": column([np.array(shape)] * len(keys)),
            "latent_std": column([np.full(shape, 0.5, np.float16).tobytes()] * len(keys)),
            "aspect": np.full(len(keys), shape[2] / shape[1])}


def test_the_batcher_tokenises_the_captions_it_keeps(tmp_path):
    """Tokens are made by the prefetch thread's batcher from the captions after dropout (the empty prompt
    included), as the text encoder would make them on the training thread."""
    from hdm_model import TextEncoder
    from tests.tiny_models import make_tiny_text_encoder

    encoder = TextEncoder.from_pretrained(str(make_tiny_text_encoder(tmp_path / "te")), max_length=12)
    batcher = LatentBatcher(caption_dropout=0.5, seed=3, tokenize=lambda c: encoder.tokenize(c, padding="max_length"))
    batch = batcher(_latent_rows([f"k{i}" for i in range(8)]), epoch=0)
    want = encoder.tokenize(batch.captions, padding="max_length")
    assert "" in batch.captions and list(batch.tokens.prompts) == batch.captions
    assert torch.equal(batch.tokens.ids, want.ids) and torch.equal(batch.tokens.mask, want.mask)
    torch.testing.assert_close(encoder.encode_tokens(batch.tokens), encoder(batch.captions), rtol=0, atol=0)


def test_a_samples_draws_depend_on_seed_epoch_and_key_only():
    batcher = LatentBatcher(caption_dropout=0.5, seed=3)
    rows = _latent_rows([f"k{i}" for i in range(8)])
    first = batcher(rows, epoch=0)
    moved = batcher({name: column[::-1].copy() for name, column in rows.items()}, epoch=0)  # other order
    again = batcher(rows, epoch=0)
    later = batcher(rows, epoch=1)
    assert moved.keys == first.keys[::-1] and first.latents.shape == (8, 4, 4, 4)
    torch.testing.assert_close(moved.latents.flip(0), first.latents, rtol=0, atol=0)  # posterior draw and crop
    torch.testing.assert_close(moved.positions.flip(0), first.positions, rtol=0, atol=0)
    assert moved.captions[::-1] == first.captions == again.captions
    assert 0 < first.captions.count("") < 8  # dropout is drawn per sample
    assert not torch.allclose(later.latents, first.latents)  # a new posterior sample every epoch
    offsets = {tuple(p[0].tolist()) for p in torch.cat([first.positions, later.positions])}
    assert len(offsets) > 1  # and the crop moves


def test_step_draws_come_from_the_generator_alone():
    from hdm_model import flow_matching_loss

    torch.manual_seed(0)
    model = build_denoiser("tiny", ctx_dim=32, tread_rate=0.5).train()
    z0, ctx = torch.randn(2, 4, 4, 4), torch.randn(2, 3, 32)
    state = torch.get_rng_state()

    def loss(rank: int, step: int) -> float:
        draws = step_generator(seed=1, rank=rank, step=step, micro=0, device=torch.device("cpu"))
        return flow_matching_loss(model, z0, ctx, generator=draws).item()

    assert loss(0, 5) == loss(0, 5)  # timesteps, noise and TREAD mask all seeded
    assert len({loss(0, 5), loss(1, 5), loss(0, 6)}) == 3  # other rank, other step: other draws
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was never drawn from


def test_derived_seeds_are_the_same_in_another_process():
    import subprocess
    import sys

    code = "from pipelines.train.batches import derive_seed; print(derive_seed(7, 1, 'img0003'))"
    seeds = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONHASHSEED": salt}).stdout.strip() for salt in ("1", "2")}
    assert seeds == {str(derive_seed(7, 1, "img0003"))}
    assert derive_seed(7, 1, "img0003") != derive_seed(7, 1, "img0004") != derive_seed(7, 2, "img0004")


def test_without_keys_regroups_the_rows_left_in_read_order():
    batches = [_latent_rows([f"k{i}" for i in range(j, j + 3)]) for j in (0, 3, 6)]
    out = list(without_keys(batches, drop=frozenset({"k0", "k4"}), batch_size=2))
    assert [b["key"].tolist() for b in out] == [["k1", "k2"], ["k3", "k5"], ["k6", "k7"]]  # k8 left over
    assert all(len(b["latent"]) == len(b["latent_shape"]) == len(b["aspect"]) == 2 for b in out)


def test_a_checkpoint_without_trained_keys_resumes_at_the_start_of_its_epoch(tmp_path, capsys):
    cfg = _stage(tmp_path)
    net, optimizer, scheduler, _ = _trained(cfg, steps=2)
    save_checkpoint(tmp_path, model=net, cfg=cfg, vae="v", optimizer=optimizer, scheduler=scheduler, ema=None,
                    progress={"step": 2, "epoch": 1}, epoch_keys=["k1"])
    state = torch.load(tmp_path / TRAINING_STATE, weights_only=True)
    del state["epoch_keys"]  # the format before resume by keys: a batch count and the global RNG
    torch.save({**state, "batch_in_epoch": 2, "rng": {"torch": torch.get_rng_state()}}, tmp_path / TRAINING_STATE)
    fresh, fresh_opt, fresh_sched, _ = _trained(cfg, steps=0)
    assert restore_checkpoint(tmp_path, fresh, fresh_opt, fresh_sched, None) == ({"step": 2, "epoch": 1}, frozenset())
    assert "epoch 1 restarts from its beginning" in capsys.readouterr().out


class _Listed:
    """A rank's batches in a resumed epoch, then END_OF_EPOCH (what BatchPrefetcher.next() hands out)."""

    def __init__(self, items: list):
        self.items = iter([*items, END_OF_EPOCH])

    def next(self):
        return next(self.items)


def _one_row(x: torch.Tensor, keys: list[str]) -> MicroBatch:
    return MicroBatch(latents=x, positions=torch.zeros(1), aspect=torch.zeros(1), captions=[""], keys=keys)


def _uneven_rank(rank: int, world: int, port: int, counts: list[int], out: str) -> None:
    """One gloo rank of a DDP linear model through a resumed epoch with counts[rank] batches."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 1))
    data = _Listed([_one_row(torch.tensor([[rank + 1.0, i + 1.0]]), [f"r{rank}b{i}"]) for i in range(counts[rank])])
    epoch = ResumedEpoch(world=world, device=torch.device("cpu"), blank=_one_row(torch.zeros(1, 2), []))
    grads, keys = [], []
    while (pair := epoch.next(data))[0] is not END_OF_EPOCH:
        batch, weight = pair
        model.zero_grad()
        (model(batch.latents).sum() * weight).backward()  # d/dW = the row, times its weight
        grads.append(model.module.weight.grad.clone())
        keys.append(batch.keys)
    torch.save({"grads": grads, "keys": keys}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_ranks_with_uneven_batches_left_train_them_all_in_step(tmp_path):
    """Rank 0 has 1 batch left in its resumed epoch, rank 1 has 3: both run 3 backward passes (DDP would hang
    otherwise); rank 0's 2nd and 3rd are blank with weight 0 and rank 1's weight 2, so DDP's mean gradient is
    the mean over the real batches only."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = torch.multiprocessing.spawn(_uneven_rank, args=(2, port, [1, 3], str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 180
    while not procs.join(timeout=5):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail("the ranks did not finish the epoch together")
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["keys"] == [["r0b0"], [], []] and r1["keys"] == [["r1b0"], ["r1b1"], ["r1b2"]]
    expected = [torch.tensor([[1.5, 1.0]]), torch.tensor([[2.0, 2.0]]), torch.tensor([[2.0, 3.0]])]
    for grads in (r0["grads"], r1["grads"]):
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_init_from_the_converters_release_file(tmp_path):
    """--init-from with the file the original's converter writes (fp16, vae.*, vae_mean / vae_std): the stage's
    model starts from its weights (fp16 values, exactly); a pickle is refused without being unpickled."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from hdm_model import build_denoiser, load_official_hdm
    from pipelines.train.worker import load_weights

    from tests.hdm_model.original_layouts import arch_of, converter_file_state, spec_state

    model = build_denoiser("tiny")
    arch = arch_of(model.config)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, layers_per_block=1)
    path = tmp_path / "hdm-release.safetensors"
    save_file(converter_file_state(spec_state(arch), vae.state_dict(), vae_mean=[0.0] * 4, vae_std=[1.0] * 4), path)
    load_weights(model, str(path))
    reference = load_official_hdm(path, arch)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    pickle = tmp_path / "hdm.ckpt"
    torch.save({"state_dict": {}}, pickle)
    with pytest.raises(ValueError, match="pickle|ckpt_converter"):
        load_weights(model, str(pickle))
