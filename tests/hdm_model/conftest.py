import pytest
import torch

from hdm_model import XUTConfig, build_denoiser


@pytest.fixture
def tiny_config() -> XUTConfig:
    return XUTConfig.preset("tiny")


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    model = build_denoiser(tiny_config)
    _randomise_zero_inits(model)
    return model


def _randomise_zero_inits(model) -> None:
    """Zero-initialised layers hide bugs (a missing modulation looks like a correct one): fill them."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
        model.unpatch.weight.normal_(0, 0.05, generator=gen)


def tiny_inputs(config: XUTConfig, *, batch=2, h=8, w=8, n_text=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, h, w, generator=gen)
    t = torch.rand(batch, generator=gen)
    ctx = torch.randn(batch, n_text, config.ctx_dim, generator=gen)
    return x, t, ctx
