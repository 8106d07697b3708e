from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from hdm_model import LatentVAE
from hdm_model.eqvae import (DEFAULT_SCALES, VAE_CONFIGS, EQConfig, LatentMoments, Transform, build_vae,
                             eq_vae_loss, equivariance_error, kl_divergence, latent_moments, psnr, reconstruct,
                             sample_transform, set_latent_stats)
from hdm_model.vae import latent_stats


@pytest.fixture
def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return build_vae("tiny")


def smooth_images(n: int, size: int, *, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: a random colour gradient plus one Gaussian blob per image."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images = []
    for _ in range(n):
        a, b, c = (torch.rand(3, 3, 1, 1, generator=gen) * 2 - 1).unbind(1)  # 3 colours, (3, 1, 1) each
        cx, cy = (torch.rand(2, generator=gen) * 1.2 - 0.6).tolist()
        r = 0.2 + 0.4 * torch.rand((), generator=gen).item()
        blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        images.append((0.5 * a * xx + 0.5 * b * yy + c * blob).clamp(-1, 1))
    return torch.stack(images)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions gain little from a second thread, and on a loaded 2-core box two OpenMP threads
    spin-wait on each other: steps measured 10-50x slower than with one. Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- configs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, low, high", [("tiny", 1e5, 5e5), ("small", 2e6, 8e6)])
def test_named_configs_are_f8_with_4_channels(name, low, high):
    torch.manual_seed(0)
    vae = build_vae(name)
    assert low < sum(p.numel() for p in vae.parameters()) < high
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 32, 48)).latent_dist.mode()
        assert z.shape == (1, 4, 4, 6)
        assert vae.decode(z).sample.shape == (1, 3, 32, 48)


def test_build_vae_is_seeded_by_the_caller_and_takes_overrides():
    torch.manual_seed(1)
    a = build_vae("tiny")
    torch.manual_seed(1)
    b = build_vae("tiny")
    torch.testing.assert_close(a.encoder.conv_in.weight, b.encoder.conv_in.weight, rtol=0, atol=0)
    assert not torch.equal(a.encoder.conv_in.weight, build_vae("tiny").encoder.conv_in.weight)
    assert build_vae("tiny", latent_channels=8).config.latent_channels == 8
    assert VAE_CONFIGS["tiny"]["block_out_channels"] != VAE_CONFIGS["small"]["block_out_channels"]


def test_eq_config_defaults_and_validation():
    cfg = EQConfig()
    assert cfg.p_eq == 0.5 and cfg.rotations == (1, 2, 3) and cfg.kl_weight == 1e-6 and cfg.pixel_loss == "l1"
    assert cfg.scales == tuple(m / 32 for m in range(8, 32)) == DEFAULT_SCALES
    assert EQConfig(scales=[0.5, 0.75], rotations=[0, 2]).scales == (0.5, 0.75)  # lists become tuples
    for bad in (dict(p_eq=1.5), dict(p_eq=-0.1), dict(scales=()), dict(scales=(0.0,)), dict(scales=(1.5,)),
                dict(rotations=(4,)), dict(rotations=()), dict(pixel_loss="l2"), dict(kl_weight=-1.0),
                dict(adv_weight=-0.5), dict(lpips_weight=float("nan"))):
        with pytest.raises(ValueError):
            EQConfig(**bad)


# ---- transforms ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(32, 32), (64, 64), (32, 64)])
def test_decoded_transformed_latent_matches_transformed_image(tiny_vae, height, width):
    x = torch.rand(1, 3, height, width) * 2 - 1
    with torch.no_grad():
        z = tiny_vae.encode(x).latent_dist.mode()  # (1, 4, H/8, W/8)
        for i, scale in enumerate(DEFAULT_SCALES[::3] + (1.0,)):
            tau = Transform(scale=scale, k=i % 4)
            z_t, x_t = tau.apply_pair(z, x)
            assert tiny_vae.decode(z_t).sample.shape == x_t.shape
            assert x_t.shape[-2:] == tuple(8 * s for s in z_t.shape[-2:])
            if i % 2:  # odd k swaps height and width
                assert z_t.shape[-2:] == tau.size(*z.shape[-2:])[::-1]


def test_sizes_are_exact_at_256_px_and_latent_first_elsewhere():
    x, z = torch.zeros(1, 3, 256, 256), torch.zeros(1, 4, 32, 32)
    for m in range(8, 32):
        tau = Transform(scale=m / 32, k=1)
        z_t, x_t = tau.apply_pair(z, x)
        assert z_t.shape[-2:] == (m, m) and x_t.shape[-2:] == (8 * m, 8 * m) == tau.apply(x).shape[-2:]
    # 32 px, s = 10/32: the latent 4 -> round(1.25) = 1, so the image target is 8 px, not round(10.0) = 10
    z_t, x_t = Transform(scale=10 / 32, k=0).apply_pair(torch.zeros(1, 4, 4, 4), torch.zeros(1, 3, 32, 32))
    assert z_t.shape[-2:] == (1, 1) and x_t.shape[-2:] == (8, 8)
    with pytest.raises(ValueError):
        Transform(scale=0.5, k=0).apply_pair(torch.zeros(1, 4, 4, 4), torch.zeros(1, 3, 30, 32))


def test_transform_is_bilinear_resize_then_rot90():
    x = torch.randn(2, 3, 16, 12)
    for k in (1, 2, 3):
        back = Transform(scale=1.0, k=4 - k).apply(Transform(scale=1.0, k=k).apply(x))
        torch.testing.assert_close(back, x, rtol=0, atol=0)
    expected = torch.rot90(F.interpolate(x, size=(12, 9), mode="bilinear", align_corners=False), 3, dims=(-2, -1))
    torch.testing.assert_close(Transform(scale=0.75, k=3).apply(x), expected)
    # one corner pixel moves where rot90 (counter-clockwise) puts it
    assert Transform(scale=1.0, k=1).apply(x)[..., -1, 0].equal(x[..., 0, 0])


def test_sample_transform_probabilities_and_reproducibility():
    never, always, half = EQConfig(p_eq=0.0), EQConfig(p_eq=1.0), EQConfig()
    gen = torch.Generator().manual_seed(0)
    assert all(sample_transform(never, generator=gen) is None for _ in range(200))
    draws = [sample_transform(always, generator=gen) for _ in range(300)]
    assert all(isinstance(t, Transform) for t in draws)
    assert {t.k for t in draws} == {1, 2, 3} and {t.scale for t in draws} <= set(DEFAULT_SCALES)
    assert len({t.scale for t in draws}) > 15
    hits = sum(sample_transform(half, generator=gen) is not None for _ in range(2000))
    assert 900 < hits < 1100

    def sequence(seed: int) -> list:
        g = torch.Generator().manual_seed(seed)
        return [sample_transform(half, generator=g) for _ in range(50)]

    assert sequence(3) == sequence(3) != sequence(4)


# ---- the objective -------------------------------------------------------------------------------------------


def test_loss_equals_a_hand_computation(tiny_vae):
    x = smooth_images(2, 32)
    for cfg in (EQConfig(p_eq=0.0, kl_weight=0.1, pixel_loss="mse"), EQConfig(p_eq=1.0, kl_weight=0.1),
                EQConfig(p_eq=1.0, pixel_loss="l1+mse")):
        loss, parts = eq_vae_loss(tiny_vae, x, cfg, generator=torch.Generator().manual_seed(5))

        gen = torch.Generator().manual_seed(5)  # same draws, same order: eps, then tau
        with torch.no_grad():
            post = tiny_vae.encode(x).latent_dist
            z = post.mean + torch.exp(0.5 * post.logvar) * torch.randn(post.mean.shape, generator=gen)
            tau = sample_transform(cfg, generator=gen)
            z_t, target = tau.apply_pair(z, x) if tau else (z, x)
            x_hat = tiny_vae.decode(z_t).sample
            kl_sum = 0.5 * (post.mean ** 2 + post.logvar.exp() - 1 - post.logvar).sum()
            torch.testing.assert_close(kl_sum, post.kl().sum())  # diffusers' own KL, summed over the batch
            kl = kl_sum / x_hat.numel()
            rec = {"mse": F.mse_loss(x_hat, target), "l1": F.l1_loss(x_hat, target),
                   "l1+mse": F.l1_loss(x_hat, target) + F.mse_loss(x_hat, target)}[cfg.pixel_loss]
        torch.testing.assert_close(loss.detach(), rec + cfg.kl_weight * kl)
        assert parts["kl"] == pytest.approx(kl.item(), rel=1e-5)
        assert parts["rec"] == pytest.approx(rec.item(), rel=1e-5)
        assert parts["loss"] == pytest.approx(loss.item())
        assert parts["eq"] == float(cfg.p_eq == 1.0)
        if tau is not None:
            assert (parts["scale"], parts["k"]) == (tau.scale, tau.k) and x_hat.shape[-1] < 32
    assert kl_divergence(torch.zeros(3), torch.zeros(3)).item() == 0.0


def test_same_generator_state_gives_the_same_step(tiny_vae):
    x = smooth_images(2, 32)
    a = eq_vae_loss(tiny_vae, x, EQConfig(), generator=torch.Generator().manual_seed(2))
    b = eq_vae_loss(tiny_vae, x, EQConfig(), generator=torch.Generator().manual_seed(2))
    assert a[1] == b[1]


def _grad_norm(module: torch.nn.Module) -> float:
    return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("p_eq", [0.0, 1.0])
def test_gradients_reach_encoder_and_decoder_unless_decoder_only(tiny_vae, p_eq):
    x = smooth_images(2, 32)
    cfg = EQConfig(p_eq=p_eq)
    loss, _ = eq_vae_loss(tiny_vae, x, cfg, generator=torch.Generator().manual_seed(0))
    loss.backward()
    for part in (tiny_vae.encoder, tiny_vae.quant_conv, tiny_vae.post_quant_conv, tiny_vae.decoder):
        assert _grad_norm(part) > 0  # with p_eq = 1 the encoder learns through tau(z) only

    tiny_vae.zero_grad(set_to_none=True)
    loss, _ = eq_vae_loss(tiny_vae, x, cfg, generator=torch.Generator().manual_seed(0), train_encoder=False)
    loss.backward()
    assert all(p.grad is None for p in [*tiny_vae.encoder.parameters(), *tiny_vae.quant_conv.parameters()])
    assert _grad_norm(tiny_vae.decoder) > 0 and _grad_norm(tiny_vae.post_quant_conv) > 0


def test_perceptual_and_adversarial_terms_are_refused(tiny_vae):
    for cfg in (EQConfig(lpips_weight=1.0), EQConfig(adv_weight=0.5)):
        with pytest.raises(NotImplementedError, match="lpips_weight = adv_weight = 0"):
            eq_vae_loss(tiny_vae, smooth_images(1, 32), cfg)


@dataclass
class EQLearning:
    psnr_before: float
    psnr_after: float
    eq_before: float
    eq_after: float
    transformed: float  # batches (of 80) that took the equivariance transform
    still_training: bool


def learn_eq_objective(seed: int, *, p_eq: float = 0.5) -> EQLearning:
    """80 Adam steps of the EQ-VAE objective (`p_eq` of the batches transformed) on a fixed batch of two smooth
    64 px images; `seed` draws the initial weights and the transforms. Also run by
    benchmarks/measure_test_margins.py."""
    torch.manual_seed(seed)
    vae = build_vae("tiny").train()
    x = smooth_images(2, 64)
    taus = [Transform(scale=0.5, k=1), Transform(scale=0.75, k=2), Transform(scale=1.0, k=3)]
    psnr_before, eq_before = psnr(reconstruct(vae, x), x), equivariance_error(vae, x, taus)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    transformed = 0.0
    for _ in range(80):
        loss, parts = eq_vae_loss(vae, x, EQConfig(p_eq=p_eq), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        transformed += parts["eq"]
    return EQLearning(psnr_before=psnr_before, psnr_after=psnr(reconstruct(vae, x), x), eq_before=eq_before,
                      eq_after=equivariance_error(vae, x, taus), transformed=transformed,
                      still_training=vae.training)


def test_tiny_vae_learns_with_the_eq_objective():
    """Real learning: the EQ objective raises reconstruction PSNR and cuts the equivariance error. 64 px rather
    than 32: the transformed batches then decode 16-56 px images, which help the full-size reconstruction
    (32 px gains only 6-8 dB at the same cost).

    Margins (benchmarks/measure_test_margins.py eqvae-unit, seeds 0-9 x 1 and 2 torch threads, 20 runs on a
    2-core x86 box): PSNR gain 8.04-11.32 dB (bound 6.0: >= 2.0 dB to spare); eq_after / eq_before
    0.101-0.162 (bound 0.3: 1.85x to spare); transformed batches 34-42 (bounds 25 and 55). Seed 0 here: 9.42 dB
    on 1 thread, 9.44 on 2, so a machine's thread count moves the gain by hundredths of a dB, seeds by ~1."""
    r = learn_eq_objective(seed=0)
    assert 25 <= r.transformed <= 55  # Binomial(80, 0.5): 40 +- 15 is 3.4 standard deviations
    assert r.psnr_after - r.psnr_before >= 6.0, (r.psnr_before, r.psnr_after)
    assert r.eq_after < 0.3 * r.eq_before, (r.eq_before, r.eq_after)
    assert r.still_training  # the metrics restore the mode they found



def test_the_equivariance_term_is_what_lowers_the_equivariance_error():
    """Same seed, images and steps, the EQ term on every step vs never: the equivariance error after training
    is much lower with it. Margin (measured for issue 14 over seeds 0-4 x 1 and 2 torch threads, 10 pairs on a
    2-core x86 box): with / without = 0.262-0.368 (with 0.216-0.302, without 0.588-1.071); the bound 0.6 has
    1.6x to spare. (The job-level comparison after 150 steps sat inside seed noise: 0.81-1.26.)"""
    with_eq, without = learn_eq_objective(seed=0, p_eq=1.0), learn_eq_objective(seed=0, p_eq=0.0)
    assert with_eq.transformed == 80 and without.transformed == 0
    assert with_eq.eq_after < 0.6 * without.eq_after, (with_eq.eq_after, without.eq_after)

# ---- metrics -------------------------------------------------------------------------------------------------


def test_psnr_is_a_mean_of_per_image_values():
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0] += 0.2  # 0.1 on [0, 1]: MSE 1e-2, 20 dB
    y[1] += 0.02  # MSE 1e-4, 40 dB
    assert psnr(x, y) == pytest.approx(30.0, abs=1e-3)
    assert psnr(x[:1], y[:1]) == pytest.approx(20.0, abs=1e-3)
    assert psnr(x, x) == pytest.approx(100.0)


def test_reconstruct_and_equivariance_error(tiny_vae):
    x = smooth_images(2, 32)
    tiny_vae.train()
    out = reconstruct(tiny_vae, x)
    assert out.shape == x.shape and out.abs().max() <= 1 and not out.requires_grad and tiny_vae.training
    with torch.no_grad():  # a decoder that outputs zeros has normalised error exactly 1
        tiny_vae.decoder.conv_out.weight.zero_()
        tiny_vae.decoder.conv_out.bias.zero_()
    taus = [Transform(scale=0.5, k=1), Transform(scale=1.0, k=2)]
    assert equivariance_error(tiny_vae, x, taus) == pytest.approx(1.0)
    assert tiny_vae.training and all(p.grad is None for p in tiny_vae.parameters())


# ---- latent statistics ---------------------------------------------------------------------------------------


def test_latent_moments_match_torch_and_merge():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, 5, 7, generator=gen) * torch.tensor([1.0, 3.0, 0.5, 8.0]).view(1, 4, 1, 1)
    z = z + torch.tensor([0.0, -2.0, 5.0, 1.0]).view(1, 4, 1, 1)
    whole = LatentMoments().update(z)
    mean, std = whole.mean_std()
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), z.double().mean((0, 2, 3)))
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), z.double().std((0, 2, 3), correction=0))
    merged = LatentMoments().update(z[:2]).merge(LatentMoments().update(z[2:]))
    assert merged.count.tolist() == whole.count.tolist() == [6 * 5 * 7] * 4
    torch.testing.assert_close(torch.tensor(merged.mean_std()), torch.tensor(whole.mean_std()))
    assert LatentMoments().merge(whole).mean_std() == whole.mean_std()
    # the all-reduce path: packed partials summed elementwise, as dist.all_reduce(SUM) does
    packed = LatentMoments().update(z[:1]).to_tensor() + LatentMoments().update(z[1:]).to_tensor()
    packed += LatentMoments(channels=4).to_tensor()  # an empty worker
    torch.testing.assert_close(torch.tensor(LatentMoments.from_tensor(packed).mean_std()),
                               torch.tensor(whole.mean_std()))
    for empty in (LatentMoments(), LatentMoments(channels=4)):
        with pytest.raises(ValueError):
            empty.mean_std()
    with pytest.raises(ValueError):
        LatentMoments(channels=3).update(z)


def test_latent_moments_of_a_vae(tiny_vae):
    batches = [smooth_images(2, 32, seed=s) for s in range(3)]
    mode = latent_moments(tiny_vae, batches, sample=False)
    with torch.no_grad():
        z = torch.cat([tiny_vae.encode(b).latent_dist.mode() for b in batches])
    torch.testing.assert_close(torch.tensor(mode.mean_std()[0], dtype=torch.float64), z.double().mean((0, 2, 3)))
    sampled = latent_moments(tiny_vae, batches, generator=torch.Generator().manual_seed(0))
    assert sampled.count.tolist() == mode.count.tolist() == [3 * 2 * 4 * 4] * 4
    assert sampled.mean_std() != mode.mean_std()  # a posterior sample, as the diffusion stage draws


def test_set_latent_stats_round_trips_through_save_pretrained(tiny_vae, tmp_path):
    mean, std = [0.5, -1.25, 2.0, 0.0], [3.0, 0.75, 1.5, 6.0]
    set_latent_stats(tiny_vae, mean, std)
    tiny_vae.save_pretrained(tmp_path / "vae")
    loaded = build_vae(str(tmp_path / "vae"))
    assert list(loaded.config.latents_mean) == mean and list(loaded.config.latents_std) == std
    for config in (loaded.config, AutoencoderKL.load_config(tmp_path / "vae")):
        got_mean, got_std = latent_stats(config)
        torch.testing.assert_close(got_mean, torch.tensor(mean))
        torch.testing.assert_close(got_std, torch.tensor(std))
    torch.testing.assert_close(LatentVAE(loaded).std.flatten(), torch.tensor(std))
    torch.testing.assert_close(loaded.decoder.conv_out.weight, tiny_vae.decoder.conv_out.weight)
    with pytest.raises(ValueError):
        set_latent_stats(tiny_vae, mean[:3], std[:3])
    with pytest.raises(ValueError):
        set_latent_stats(tiny_vae, mean, [1.0, 1.0, 0.0, 1.0])
