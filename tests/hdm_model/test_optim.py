
import pytest

from hdm_model import build_optimizer, mup_param_groups, warmup_cosine_schedule
from hdm_model.optim import lr_multiplier


def _lr_of(groups, name):
    (lr,) = [g["lr"] for g in groups if name in g["names"]]
    return lr


@pytest.mark.parametrize("name, fan_in", [
    ("pre_blocks.0.attn.qkv.weight", 64),  # Linear: in_features
    ("pre_blocks.0.mlp.w3.weight", 128),  # SwiGLU w3: the hidden width
    ("pre_blocks.0.mlp.w12.bias", 256),  # vectors: numel
    ("pre_blocks.0.attn_norm.weight", 64),
    ("patch_embed.weight", 4 * 2 * 2),  # conv: prod(shape[1:])
    ("pre_blocks.0.attn.rope.log_freqs", 4 * 2),  # (heads, head_dim/4, 2): prod(shape[1:])
    ("aspect_embed.0.weight", 1),  # the first addon Linear gets the full base lr
    ("modulation.attn.3.weight", 256),
    ("unpatch.bias", 16),
])
def test_mup_learning_rate_is_base_over_fan_in(tiny_model, name, fan_in):
    groups = mup_param_groups(tiny_model, 0.5, weight_decay=0.02)
    assert _lr_of(groups, name) == pytest.approx(0.5 / fan_in)


def test_every_tensor_in_exactly_one_group_with_weight_decay(tiny_model):
    opt = build_optimizer(tiny_model, base_lr=0.1, weight_decay=0.01)
    names = [n for g in opt.param_groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in tiny_model.named_parameters())
    assert all(g["weight_decay"] == 0.01 for g in opt.param_groups)


def test_schedule_warmup_then_cosine_to_one_percent(tiny_model):
    opt = build_optimizer(tiny_model, base_lr=0.1, weight_decay=0.0)
    peak = [g["lr"] for g in opt.param_groups]
    sched = warmup_cosine_schedule(opt, total_steps=30, warmup_steps=10)
    seen = []
    for _ in range(31):
        seen.append(opt.param_groups[0]["lr"] / peak[0])
        opt.step()
        sched.step()
    assert seen[0] == 0 and seen[5] == pytest.approx(0.5) and seen[10] == pytest.approx(1.0)
    assert seen[20] == pytest.approx(0.01 + 0.99 * 0.5)
    assert seen[30] == pytest.approx(0.01)
    assert lr_multiplier(10_000, total_steps=30, warmup_steps=10) == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(seen[10:], seen[11:]))
