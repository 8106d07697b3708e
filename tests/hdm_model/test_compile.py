"""torch.compile of the denoiser: compiled and eager agree, no graph break inside a block or the "full" core.

Compiles are slow on a small CPU: the model-level checks use the aot_eager backend (dynamo + autograd tracing,
what graph breaks and checkpoint tracing depend on); one check runs inductor on a single block.
"""

import pytest
import torch
from torch import nn

from hdm_model import XUTConfig, build_denoiser, make_axial_pos, tread
from hdm_model.compile import compile_denoiser, compile_text_encoder, resolve_compile
from hdm_model.layers import Block

from .conftest import _randomise_zero_inits, tiny_inputs


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _eager_and_compiled(mode: str, checkpointing: str, *, backend: str = "aot_eager"):
    torch.manual_seed(0)
    eager = build_denoiser("tiny", checkpointing=checkpointing)
    _randomise_zero_inits(eager)
    compiled = build_denoiser("tiny", checkpointing=checkpointing)
    compiled.load_state_dict(eager.state_dict())
    return eager, compile_denoiser(compiled, mode, backend=backend)


def _train_step(model, *, h=8, w=12):
    """Output and parameter gradients of one TREAD training forward/backward with a seeded routing draw."""
    x, t, ctx = tiny_inputs(model.config, h=h, w=w)
    pos_map = (make_axial_pos(h, w) + 0.1).expand(2, -1, -1)
    model.train()
    model.zero_grad()
    v = model(x, t, ctx, pos_map=pos_map, aspect=torch.tensor([0.3, -0.2]),
              generator=torch.Generator().manual_seed(3))
    v.square().mean().backward()
    return v.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("mode,checkpointing", [("blocks", "none"), ("blocks", "mlp"), ("blocks", "full"),
                                                ("full", "outer"), ("full", "mlp")])
def test_compiled_matches_eager(mode, checkpointing):
    eager, compiled = _eager_and_compiled(mode, checkpointing)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints unchanged by compiling
    out, grads = _train_step(eager)
    for _ in range(2):  # the second call runs the cached graphs
        out_c, grads_c = _train_step(compiled)
        torch.testing.assert_close(out_c, out, atol=1e-6, rtol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(grads_c[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_inductor_block_matches_eager():
    """The real backend on one block: forward and gradients (the mlp checkpoint inside included)."""
    torch.manual_seed(0)
    config = XUTConfig.preset("tiny", checkpointing="mlp")
    model = build_denoiser(config)
    _randomise_zero_inits(model)
    block, (x, block_ctx, source) = model.backbone.decoder[0][0], _block_inputs(model)
    results = []
    for compile_it in (False, True):
        if compile_it:
            block.compile(dynamic=False)
        block.zero_grad()
        x.grad = None
        out = block(x, block_ctx, source)
        out.square().mean().backward()
        results.append((out.detach(), x.grad, [p.grad for p in block.parameters()]))
    (out, x_grad, grads), (out_c, x_grad_c, grads_c) = results
    torch.testing.assert_close(out_c, out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(x_grad_c, x_grad, atol=1e-5, rtol=1e-4)
    for grad_c, grad in zip(grads_c, grads):
        torch.testing.assert_close(grad_c, grad, atol=1e-5, rtol=1e-4)


def _block_inputs(model, *, n_image=16, n_text=5):
    """A stream, its block context and a cross-attention source as the denoiser hands them to a block."""
    gen = torch.Generator().manual_seed(0)
    n, dim = n_image + n_text, model.config.dim
    with torch.no_grad():
        cond = model._condition(torch.rand(2, generator=gen), None)
        pos = torch.cat([torch.randn(2, n_image, 2, generator=gen), torch.zeros(2, n_text, 2)], dim=1)
        block_ctx = model.modulation(cond, pos, n_text=n_text)
    x = torch.randn(2, n, dim, generator=gen, requires_grad=True)
    return x, block_ctx, torch.randn(2, n, dim, generator=gen)


@pytest.mark.parametrize("checkpointing", ["none", "mlp"])
@pytest.mark.parametrize("cross", [False, True])
def test_no_graph_break_inside_a_block(checkpointing, cross):
    model = build_denoiser("tiny", checkpointing=checkpointing).train()
    block = model.backbone.decoder[0][0] if cross else model.pre_blocks[0]
    assert isinstance(block, Block) and (block.xattn is not None) == cross
    x, block_ctx, source = _block_inputs(model)
    explanation = torch._dynamo.explain(block)(x, block_ctx, source if cross else None)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_full_mode_core_has_no_graph_break_with_tread():
    model = build_denoiser("tiny", checkpointing="full").train()
    x, t, ctx = tiny_inputs(model.config, h=8, w=12)
    keep = tread.select_tokens(2, 24, ctx.shape[1], 0.5, device=torch.device("cpu"))
    pos_map = make_axial_pos(8, 12).expand(2, -1, -1)
    explanation = torch._dynamo.explain(model.forward_core)(
        x, t, ctx, pos_map=pos_map, aspect=torch.tensor([0.3, -0.2]), keep=keep)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_resolve_compile():
    assert resolve_compile("auto", "cuda") == "blocks"
    assert resolve_compile("auto", torch.device("cuda", 1)) == "blocks"
    assert resolve_compile("auto", "cpu") == "off"
    assert resolve_compile("full", "cpu") == "full"
    with pytest.raises(ValueError, match="compile"):
        resolve_compile("everything", "cpu")


def test_off_leaves_the_model_eager():
    model = build_denoiser("tiny")
    assert compile_denoiser(model, "off") is model
    assert all(block._compiled_call_impl is None for block in model.modules() if isinstance(block, Block))
    assert "forward_core" not in vars(model)
    with pytest.raises(ValueError):
        compile_denoiser(model, "auto")


class _Encoder(nn.Module):
    """Stands in for TextEncoder: compile_text_encoder only needs its `model`."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(8, 8), nn.GELU())


def test_compile_text_encoder():
    encoder = _Encoder()
    keys = list(encoder.state_dict())
    assert compile_text_encoder(encoder, "off") is encoder and encoder.model._compiled_call_impl is None
    x = torch.randn(3, 8)
    expected = encoder.model(x)
    compile_text_encoder(encoder, "blocks", backend="aot_eager")
    assert list(encoder.state_dict()) == keys
    torch.testing.assert_close(encoder.model(x), expected)
    assert encoder.model(torch.randn(5, 8)).shape == (5, 8)  # another batch size
