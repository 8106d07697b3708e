import math

import pytest
import torch

from hdm_model import XUTConfig, build_denoiser, make_axial_pos
from hdm_model.layers import AxialRoPE, attention, timestep_freqs
from hdm_model.positions import resize_pos_map
from hdm_model.tread import kept_image_tokens, select_tokens

from .conftest import tiny_inputs


# -- check values of hdm_spec 11 -------------------------------------------------------------------------

def test_time_embedding_frequencies():
    freqs = timestep_freqs(1024)
    assert freqs.shape == (512,)
    torch.testing.assert_close(freqs[:4], torch.tensor([1.0, 0.98217, 0.96466, 0.94746]), atol=1e-5, rtol=0)


def test_time_embedding_is_cos_then_sin_of_1000t(tiny_model):
    emb = tiny_model.time_embed
    t = torch.tensor([0.25])
    args = 250.0 * timestep_freqs(emb.dim)
    expected = torch.nn.functional.mish(emb.proj(torch.cat([args.cos(), args.sin()])))
    torch.testing.assert_close(emb(t)[0, 0], expected)


def test_position_grid_of_2x4():
    pos = make_axial_pos(2, 4).reshape(2, 4, 2)
    torch.testing.assert_close(pos[:, 0, 0], torch.tensor([-0.25, 0.25]))
    torch.testing.assert_close(pos[0, :, 1], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    portrait = make_axial_pos(4, 2).reshape(4, 2, 2)
    torch.testing.assert_close(portrait[:, 0, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))


def test_pos_map_resize_pulls_borders_inwards():
    """hdm_spec 2.2: a 32x48 latent grid resized to the 16x24 patch grid: first row -0.6161, not -0.625."""
    pos = resize_pos_map(make_axial_pos(32, 48)[None], src_hw=(32, 48), dst_hw=(16, 24))
    assert pos[0, 0, 0].item() == pytest.approx(-0.6161, abs=1e-4)


def test_kept_tokens_at_half_rate():
    assert kept_image_tokens(256, 0.5) == 128
    assert kept_image_tokens(255, 0.5) == 128  # L - floor(L r)
    index = select_tokens(3, 256, 7, 0.5, device=torch.device("cpu"))
    assert index.shape == (3, 128 + 7)
    image = index[:, :128]
    assert (image[:, 1:] > image[:, :-1]).all()  # raster order, no repeats
    assert (index[:, 128:] == torch.arange(256, 263)).all()  # every text token kept


def test_rope_initialised_to_pi_and_rotates_every_pair():
    rope = AxialRoPE(heads=2, head_dim=8)
    assert rope.log_freqs.shape == (2, 2, 2)
    torch.testing.assert_close(rope.log_freqs.exp(), torch.full((2, 2, 2), math.pi))
    x = torch.ones(1, 2, 1, 8)
    y_only = rope(x, torch.tensor([[[0.5, 0.0]]]))[0, 0, 0]
    # pairs (0,1), (4,5) rotate with y; pairs (2,3), (6,7) with x (here x = 0: unchanged)
    c, s = math.cos(math.pi / 2), math.sin(math.pi / 2)
    torch.testing.assert_close(y_only, torch.tensor([c - s, c + s, 1, 1, c - s, c + s, 1, 1]))


def test_text_tokens_at_origin_are_not_rotated():
    rope = AxialRoPE(heads=2, head_dim=8)
    x = torch.randn(1, 2, 3, 8)
    torch.testing.assert_close(rope(x, torch.zeros(1, 3, 2)), x)


def test_rope_leaves_the_trailing_text_tokens_untouched():
    rope = AxialRoPE(heads=2, head_dim=8)
    x, pos = torch.randn(2, 2, 7, 8), torch.randn(2, 7, 2)
    out = rope(x, pos, n_text=3)
    assert torch.equal(out[:, :, 4:], x[:, :, 4:])
    assert torch.equal(out[:, :, :4], rope(x[:, :, :4], pos[:, :4]))


@pytest.mark.parametrize("cross", [False, True])
def test_shared_rope_without_text_tokens_is_bit_identical(tiny_model, cross):
    """One rotation for q and k, none for the trailing text tokens: the same bits as rotating q and k
    separately over every token (text at the origin, where the rotation is the identity)."""
    attn = tiny_model.backbone.decoder[0][0].xattn if cross else tiny_model.pre_blocks[0].attn
    gen = torch.Generator().manual_seed(0)
    x, source = torch.randn(2, 21, 64, generator=gen), torch.randn(2, 21, 64, generator=gen)
    pos = torch.cat([torch.randn(2, 16, 2, generator=gen), torch.zeros(2, 5, 2)], dim=1)
    with torch.no_grad():
        if cross:
            q, (k, v) = attn.q(x), attn.kv(source).chunk(2, dim=-1)
        else:
            q, k, v = attn.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for t in (q, k, v))
        rotated_all = attention(attn.rope(q, pos), attn.rope(k, pos), v, kernel=attn.kernel)
        expected = attn.out(rotated_all.transpose(1, 2).flatten(2))
        out = attn(x, pos, source if cross else None, n_text=5)
    assert torch.equal(out, expected)


def test_blocks_know_the_text_length(tiny_model):
    """n_text reaches every block, the routed backbone's included (text tokens stay last)."""
    x, t, ctx = tiny_inputs(tiny_model.config, n_text=5)
    seen = []
    hooks = [block.register_forward_pre_hook(lambda m, args: seen.append((args[0].shape[1], args[1].n_text)))
             for block in (tiny_model.pre_blocks[0], tiny_model.backbone.encoder[0][0])]
    tiny_model.train()
    tiny_model(x, t, ctx, tread_rate=0.5)
    for hook in hooks:
        hook.remove()
    assert seen == [(16 + 5, 5), (8 + 5, 5)]


# -- layout ------------------------------------------------------------------------------------------------

def test_unpatch_layout_is_prow_pcol_channel(tiny_model):
    model, cfg = tiny_model, tiny_model.config
    d, p, c = cfg.dim, cfg.patch_size, cfg.in_channels
    tokens = torch.zeros(1, 6, d)  # a 2 x 3 token grid
    tokens[0, 4, 0] = 1.0  # token (row 1, col 1)
    with torch.no_grad():
        model.unpatch.weight.zero_()
        model.unpatch.bias.zero_()
        model.unpatch.weight[:, 0] = torch.arange(p * p * c, dtype=torch.float32) + 1
    out = model._unpatch(tokens, 2, 3)
    assert out.shape == (1, c, 4, 6)
    for pr in range(p):
        for pc in range(p):
            for ch in range(c):
                assert out[0, ch, 2 + pr, 2 + pc] == (pr * p + pc) * c + ch + 1
    assert out.sum() == sum(range(1, p * p * c + 1))


def test_output_shape_and_non_square(tiny_model):
    tiny_model.eval()
    x, t, ctx = tiny_inputs(tiny_model.config, h=8, w=12)
    v = tiny_model(x, t, ctx, aspect=torch.log(torch.tensor([1.5, 1.5])))
    assert v.shape == x.shape
    assert torch.isfinite(v).all()


def test_full_grid_default_matches_explicit_patch_grid(tiny_model):
    """pos_map None means the whole-image grid built directly at patch resolution."""
    tiny_model.eval()
    x, t, ctx = tiny_inputs(tiny_model.config, h=8, w=12)
    captured = []
    hook = tiny_model.pre_blocks[0].register_forward_pre_hook(lambda m, args: captured.append(args[1].pos))
    tiny_model(x, t, ctx)
    hook.remove()
    torch.testing.assert_close(captured[0][0, :24], make_axial_pos(4, 6))
    assert (captured[0][0, 24:] == 0).all()


def test_pos_map_changes_the_output(tiny_model):
    tiny_model.eval()
    x, t, ctx = tiny_inputs(tiny_model.config)
    base = tiny_model(x, t, ctx)
    shifted = tiny_model(x, t, ctx, pos_map=(make_axial_pos(8, 8) + 0.3).expand(2, -1, -1))
    assert not torch.allclose(base, shifted)
    with pytest.raises(ValueError, match="pos_map"):
        tiny_model(x, t, ctx, pos_map=make_axial_pos(4, 4).expand(2, -1, -1))


def test_batch_elements_are_independent(tiny_model):
    tiny_model.eval()
    x, t, ctx = tiny_inputs(tiny_model.config, batch=3)
    full = tiny_model(x, t, ctx)
    single = tiny_model(x[1:2], t[1:2], ctx[1:2])
    torch.testing.assert_close(full[1:2], single, atol=1e-5, rtol=1e-5)


# -- TREAD --------------------------------------------------------------------------------------------------

def _backbone_lengths(model, *call_args, **call_kwargs):
    lengths = []
    hook = model.backbone.encoder[0][0].register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    out = model(*call_args, **call_kwargs)
    hook.remove()
    return out, lengths


def test_tread_routes_only_when_asked(tiny_model):
    x, t, ctx = tiny_inputs(tiny_model.config, h=8, w=8, n_text=5)  # L = 16 image tokens
    tiny_model.train()
    assert _backbone_lengths(tiny_model, x, t, ctx)[1] == [8 + 5]  # config rate 0.5
    assert _backbone_lengths(tiny_model, x, t, ctx, tread_rate=0.25)[1] == [12 + 5]
    assert _backbone_lengths(tiny_model, x, t, ctx, tread_rate=0.0)[1] == [16 + 5]  # 0 means off
    tiny_model.eval()
    assert _backbone_lengths(tiny_model, x, t, ctx)[1] == [16 + 5]
    assert _backbone_lengths(tiny_model, x, t, ctx, tread_rate=0.0)[1] == [16 + 5]
    assert _backbone_lengths(tiny_model, x, t, ctx, tread_rate=0.5)[1] == [8 + 5]
    with pytest.raises(ValueError):
        tiny_model(x, t, ctx, tread_rate=1.0)


def test_routed_tokens_pass_the_backbone_unchanged(tiny_model):
    """Merge is the identity on routed tokens: after the backbone they equal the pre-routing stream."""
    tiny_model.eval()
    x, t, ctx = tiny_inputs(tiny_model.config, h=8, w=8)
    seen = {}
    pre = tiny_model.pre_blocks[-1].register_forward_hook(lambda m, a, out: seen.__setitem__("pre", out))
    post = tiny_model.post_blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("post", a[0]))
    gen = torch.Generator().manual_seed(3)
    tiny_model(x, t, ctx, tread_rate=0.5, generator=gen)
    pre.remove(), post.remove()
    kept = select_tokens(2, 16, 5, 0.5, device=torch.device("cpu"), generator=torch.Generator().manual_seed(3))
    routed = torch.ones(2, 21, dtype=torch.bool)
    routed.scatter_(1, kept, False)
    assert routed.sum() == 2 * 8
    torch.testing.assert_close(seen["post"][routed], seen["pre"][routed], atol=0, rtol=0)
    assert not torch.allclose(seen["post"][~routed], seen["pre"][~routed])


def test_routing_is_reproducible_with_a_generator(tiny_model):
    tiny_model.eval()
    x, t, ctx = tiny_inputs(tiny_model.config)
    a = tiny_model(x, t, ctx, tread_rate=0.5, generator=torch.Generator().manual_seed(7))
    b = tiny_model(x, t, ctx, tread_rate=0.5, generator=torch.Generator().manual_seed(7))
    c = tiny_model(x, t, ctx, tread_rate=0.5, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)


# -- runtime switches ---------------------------------------------------------------------------------------

def test_attention_kernels_agree(tiny_model):
    tiny_model.eval()
    x, t, ctx = tiny_inputs(tiny_model.config)
    math_model = build_denoiser(tiny_model.config.replace(attn_kernel="math")).eval()
    math_model.load_state_dict(tiny_model.state_dict())
    torch.testing.assert_close(tiny_model(x, t, ctx), math_model(x, t, ctx), atol=1e-5, rtol=1e-5)


def test_save_and_load_pretrained(tmp_path, tiny_model):
    tiny_model.eval()
    x, t, ctx = tiny_inputs(tiny_model.config)
    tiny_model.save_pretrained(tmp_path / "ckpt")
    loaded = type(tiny_model).from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == tiny_model.config
    torch.testing.assert_close(loaded(x, t, ctx), tiny_model(x, t, ctx), atol=0, rtol=0)


def test_init_follows_the_release():
    torch.manual_seed(0)
    model = build_denoiser(XUTConfig.preset("tiny"))
    for mlp in (model.modulation.attn, model.modulation.xattn, model.modulation.mlp):
        assert not mlp[-1].weight.any() and not mlp[-1].bias.any()
    assert not model.aspect_embed[-1].weight.any()
    assert model.unpatch.weight.std().item() == pytest.approx(1 / 64**2, rel=0.2)
    assert model.unpatch.bias.abs().max() > 0  # default uniform init, not zero
    assert (model.pre_blocks[0].attn_norm.weight == 1).all()
