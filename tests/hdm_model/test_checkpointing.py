"""Activation checkpointing policies: same loss and gradients as keeping everything, fewer saved bytes."""

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from hdm_model import build_denoiser, flow_matching_loss

from .conftest import _randomise_zero_inits, tiny_inputs

POLICIES = ("none", "outer", "mlp", "full")


def _model(checkpointing: str):
    torch.manual_seed(0)
    model = build_denoiser("tiny", checkpointing=checkpointing)
    _randomise_zero_inits(model)
    return model.train()


def _loss(model, *, h=8, w=12, n_text=5):
    """Flow-matching loss of one batch with noise, t and TREAD routing drawn from a seeded generator."""
    x, _, ctx = tiny_inputs(model.config, h=h, w=w, n_text=n_text)
    return flow_matching_loss(model, x, ctx, aspect=torch.tensor([0.2, -0.4]),
                              generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("checkpointing", POLICIES[1:])
def test_policy_gives_the_same_loss_and_gradients(checkpointing):
    results = []
    for model in (_model("none"), _model(checkpointing)):
        loss = _loss(model)
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (loss, grads), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss, atol=0, rtol=0)  # the forward is the same computation
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, atol=1e-7, rtol=1e-6, msg=name)


def saved_bytes(model, **loss_kwargs) -> int:
    """Bytes of the activations one forward keeps for backward: every tensor saved for backward (checkpoint
    inputs included), counted once per storage, parameters excluded."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[StorageWeakRef(storage).cdata] = storage  # held, so no two live storages share a key
        return tensor

    params = {StorageWeakRef(p.untyped_storage()).cdata for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = _loss(model, **loss_kwargs)
    del loss
    return sum(s.nbytes() for key, s in storages.items() if key not in params)


@pytest.mark.parametrize("tread_rate", [0.0, 0.5])
def test_policies_save_fewer_bytes(tread_rate):
    """Measured on the tiny preset (16x16 latent, 8 text tokens, batch 2), bytes kept for backward:
    TREAD 0: none 8.88 MB > outer 7.00 > mlp 6.52 > full 0.37; TREAD 0.5: none 5.86 > mlp 4.29 > outer 3.98 >
    full 0.31 (outer saves more than mlp once the backbone sees only half the image tokens)."""
    saved = {}
    for policy in POLICIES:
        model = _model(policy)
        model.config = model.config.replace(tread_rate=tread_rate)
        saved[policy] = saved_bytes(model, h=16, w=16, n_text=8)
    assert saved["none"] > saved["outer"] > saved["full"]
    assert saved["none"] > saved["mlp"] > saved["full"]
    assert saved["full"] < saved["none"] / 10


def test_policies_do_nothing_outside_training():
    model = _model("full").eval()
    x, t, ctx = tiny_inputs(model.config)
    plain = _model("none").eval()
    torch.testing.assert_close(model(x, t, ctx), plain(x, t, ctx), atol=0, rtol=0)
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, ctx, tread_rate=0.0), plain(x, t, ctx), atol=0, rtol=0)
