"""EQ-VAE training objective for a diffusers `AutoencoderKL` (eqvae_spec 2, 5, 6), plus its metrics.

EQ-VAE keeps the usual VAE loss and changes only the reconstruction target: for one random scale-and-rotate
tau per batch, the decoder must turn tau(z) into tau(x), with z drawn from q(z | x) of the *untransformed* x.
Gradients reach the encoder through tau(z), which is what makes the latent equivariant. There is no extra
latent regulariser. LPIPS and the GAN term are the spec's optional parts; without pretrained weights here the
pixel-only fallback (spec 6, "Optional parts") is what this module implements. Also left out: [Z]'s optional
low-resolution "prior preservation" branch (downscale x before encoding on 1/4 of the plain batches).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor, nn

_F8 = dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=1.0, shift_factor=0.0, force_upcast=False)

VAE_CONFIGS: dict[str, dict] = {
    # f8, 4 latent channels, the SDXL-VAE layout at tiny widths and no mid attention (~0.25 M params): learns
    # smooth 32-64 px images on a CPU in a minute. 8 norm groups: with one, the demo's VAE reconstructed better
    # (held-out 23.4 against 21.0 dB) but its latents were harder to model (the 64 px stage's loss 0.34 against
    # 0.14) and the demo's 64 px samples read colour 0.44 against 1.00 (2026-12-05).
    "tiny": dict(_F8, block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64,
                 mid_block_add_attention=False),
    # f8, the SDXL-VAE layout (channel multipliers 1-2-4-4, 2 resnets per level, mid attention) at 1/4 width
    # (~5.3 M params): a laptop demo
    "small": dict(_F8, block_out_channels=(32, 64, 128, 128), layers_per_block=2, norm_num_groups=32,
                  sample_size=256),
}

DEFAULT_SCALES = tuple(m / 32 for m in range(8, 32))  # [Z]: s = m/32, m in {8..31}
DEFAULT_ROTATIONS = (1, 2, 3)  # [Z]: k * 90 degrees, never the identity
PIXEL_LOSSES = ("l1", "mse", "l1+mse")


def build_vae(name_or_path: str, **kwargs: Any) -> AutoencoderKL:
    """A named config of `VAE_CONFIGS` -> a fresh AutoencoderKL (initialised from the caller's torch RNG;
    kwargs override constructor arguments); anything else -> `AutoencoderKL.from_pretrained(name_or_path,
    **kwargs)`, a hub id or a local directory. A name in `VAE_CONFIGS` wins over a directory of that name."""
    if name_or_path in VAE_CONFIGS:
        return AutoencoderKL(**{**VAE_CONFIGS[name_or_path], **kwargs})
    return AutoencoderKL.from_pretrained(name_or_path, **kwargs)


def spatial_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent cell: 2 ** (levels - 1), 8 for every config here."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@dataclass(frozen=True)
class EQConfig:
    """The EQ-VAE objective's knobs; defaults follow the official code [Z] and spec 6.

    p_eq: probability that a batch gets the scale-and-rotate transform, else it is a plain reconstruction.
    scales / rotations: the grids one draw picks from (uniformly); rotations are k of k * 90 degrees.
    kl_weight: weight of the KL term, which is a mean per element of the decoded image (spec 6 step 4).
    pixel_loss: "l1" ([Z]), "mse" ([H]) or "l1+mse" (the spec's no-LPIPS fallback), each a mean per element.
    lpips_weight / adv_weight: must stay 0 here (no pretrained LPIPS weights, no discriminator implemented).
    """

    p_eq: float = 0.5
    scales: tuple[float, ...] = DEFAULT_SCALES
    rotations: tuple[int, ...] = DEFAULT_ROTATIONS
    kl_weight: float = 1e-6
    pixel_loss: str = "l1"
    lpips_weight: float = 0.0
    adv_weight: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))  # lists from TOML/JSON
        object.__setattr__(self, "rotations", tuple(int(k) for k in self.rotations))
        if not 0.0 <= self.p_eq <= 1.0:
            raise ValueError(f"p_eq must be in [0, 1], got {self.p_eq}")
        if not self.scales or not all(0.0 < s <= 1.0 for s in self.scales):
            raise ValueError(f"scales must be a non-empty list of values in (0, 1], got {self.scales}")
        if not self.rotations or not all(k in (0, 1, 2, 3) for k in self.rotations):
            raise ValueError(f"rotations must be a non-empty list of k in {{0, 1, 2, 3}}, got {self.rotations}")
        if self.pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {PIXEL_LOSSES}, got {self.pixel_loss!r}")
        for name in ("kl_weight", "lpips_weight", "adv_weight"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class Transform:
    """Bilinear resize by `scale` (align_corners=False, no antialias, as [Z]), then rot90 k times over the
    last two dims. Sizes round half up and are at least 1."""

    scale: float
    k: int

    def __post_init__(self) -> None:
        if not self.scale > 0.0 or self.k not in (0, 1, 2, 3):
            raise ValueError(f"need scale > 0 and k in {{0, 1, 2, 3}}, got scale={self.scale}, k={self.k}")

    def size(self, height: int, width: int) -> tuple[int, int]:
        """(round(height * scale), round(width * scale)), half up, at least 1."""
        return max(1, math.floor(height * self.scale + 0.5)), max(1, math.floor(width * self.scale + 0.5))

    def apply(self, x: Tensor, *, size: tuple[int, int] | None = None) -> Tensor:
        """(B, C, H, W) -> (B, C, h', w') with (h', w') = size or self.size(H, W), then rotated (h', w' swap
        for odd k)."""
        size = size or self.size(*x.shape[-2:])
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
        return torch.rot90(x, self.k, dims=(-2, -1)) if self.k else x

    def apply_pair(self, z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """tau(z), tau(x) for a latent z (B, C, h, w) and its image x (B, 3, f*h, f*w).

        The latent size is picked first and the image follows as f times it, so D(tau(z)) and tau(x) always
        have the same size (with 256 px and s = m/32 this is exactly the per-tensor size, as in [Z]).
        """
        h, w = z.shape[-2:]
        f = x.shape[-2] // h
        if f < 1 or tuple(x.shape[-2:]) != (f * h, f * w):
            raise ValueError(f"image {tuple(x.shape[-2:])} is not an integer multiple of latent {(h, w)}")
        lh, lw = self.size(h, w)
        return self.apply(z, size=(lh, lw)), self.apply(x, size=(f * lh, f * lw))


def _draw_index(n: int, generator: torch.Generator | None) -> int:
    device = generator.device if generator is not None else None
    return int(torch.randint(n, (1,), generator=generator, device=device).item())


def sample_transform(cfg: EQConfig, *, generator: torch.Generator | None = None) -> Transform | None:
    """One draw per batch: None (plain reconstruction) with probability 1 - p_eq, else a Transform with a
    scale and a rotation drawn uniformly from cfg's grids. The same generator state gives the same draw."""
    device = generator.device if generator is not None else None
    if torch.rand((1,), generator=generator, device=device).item() >= cfg.p_eq:
        return None
    return Transform(scale=cfg.scales[_draw_index(len(cfg.scales), generator)],
                     k=cfg.rotations[_draw_index(len(cfg.rotations), generator)])


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, e^logvar) || N(0, I)) summed over every element: 1/2 sum(mean^2 + e^logvar - 1 - logvar)."""
    return 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).sum()


def pixel_loss(x_hat: Tensor, target: Tensor, kind: str = "l1") -> Tensor:
    """Mean per element of |x_hat - target| ("l1"), its square ("mse"), or their sum ("l1+mse")."""
    x_hat, target = x_hat.float(), target.float()
    loss = x_hat.new_zeros(())
    if kind in ("l1", "l1+mse"):
        loss = loss + F.l1_loss(x_hat, target)
    if kind in ("mse", "l1+mse"):
        loss = loss + F.mse_loss(x_hat, target)
    return loss


def eq_vae_loss(vae: AutoencoderKL, x: Tensor, cfg: EQConfig, *, generator: torch.Generator | None = None,
                train_encoder: bool = True) -> tuple[Tensor, dict[str, float]]:
    """EQ-VAE loss of one batch x (B, 3, H, W) in [-1, 1] (spec 6 steps 1-4): (loss, parts for logging).

    1. q(z | x) = N(mu, e^logvar) from the untransformed x; z = mu + sigma * eps (a sample, not the mode).
    2. tau = sample_transform(cfg) once for the batch; z' = tau(z), x' = tau(x), or z, x when tau is None.
    3. x_hat = D(z'); loss = pixel(x_hat, x') + kl_weight * KL(q(z | x)) / numel(x_hat).

    parts: "rec", "kl" (unweighted, per element), "loss", "eq" (1.0 if the batch was transformed, else 0.0),
    "scale" and "k" of the transform (1.0 and 0 when none). The generator draws eps and tau, so a seeded one
    makes the step reproducible. train_encoder=False fine-tunes the decoder only: the encoder (with
    quant_conv) runs under no_grad. Note that this is *not* EQ-VAE (spec 3): the encoder must change for the
    latent to become equivariant; it only adapts a decoder to a fixed latent.
    """
    if cfg.lpips_weight > 0 or cfg.adv_weight > 0:
        raise NotImplementedError(
            "LPIPS and the adversarial term are not implemented (no pretrained LPIPS/VGG weights offline, no "
            "discriminator): set lpips_weight = adv_weight = 0 for the spec's pixel-only fallback")
    with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
        posterior = vae.encode(x).latent_dist
        mean, logvar = posterior.mean, posterior.logvar  # (B, C, h, w); diffusers clamps logvar to [-30, 20]
    noise_device = generator.device if generator is not None else mean.device
    eps = torch.randn(mean.shape, generator=generator, device=noise_device).to(mean.device, mean.dtype)
    z = mean + torch.exp(0.5 * logvar) * eps

    tau = sample_transform(cfg, generator=generator)
    z_t, target = tau.apply_pair(z, x) if tau is not None else (z, x)
    x_hat = vae.decode(z_t).sample  # (B, 3, f*h', f*w') == target's shape by construction
    if x_hat.shape != target.shape:
        raise ValueError(f"decoded {tuple(x_hat.shape)} != target {tuple(target.shape)}: H, W must be multiples "
                         f"of {spatial_factor(vae)}")

    rec = pixel_loss(x_hat, target, cfg.pixel_loss)
    kl = kl_divergence(mean, logvar) / x_hat.numel()
    loss = rec + cfg.kl_weight * kl
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite EQ-VAE loss: {loss.item()} (rec {rec.item()}, kl {kl.item()})")
    parts = {"loss": loss.item(), "rec": rec.item(), "kl": kl.item(), "eq": float(tau is not None),
             "scale": tau.scale if tau is not None else 1.0, "k": float(tau.k) if tau is not None else 0.0}
    return loss, parts


# ---- metrics -------------------------------------------------------------------------------------------------


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def reconstruct(vae: AutoencoderKL, x: Tensor) -> Tensor:
    """x (B, 3, H, W) in [-1, 1] -> D(mode of q(z | x)) clamped to [-1, 1], under no_grad in eval mode."""
    with _eval_mode(vae):
        return vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)


def psnr(x: Tensor, y: Tensor) -> float:
    """Mean over the batch of per-image PSNR in dB, images in [-1, 1] mapped (and clamped) to [0, 1].
    An exact match is capped at 100 dB (MSE floored at 1e-10)."""
    x01, y01 = ((x.float() + 1) / 2).clamp(0, 1), ((y.float() + 1) / 2).clamp(0, 1)
    mse = (x01 - y01).pow(2).flatten(1).mean(1).clamp_min(1e-10)  # (B,)
    return (-10.0 * torch.log10(mse)).mean().item()


def equivariance_error(vae: AutoencoderKL, x: Tensor, transforms: Sequence[Transform]) -> float:
    """Mean over `transforms` of the normalised error ||D(T(E(x).mode)) - T(x)||^2 / ||T(x)||^2, each norm
    summed over the whole batch (not per image, so a near-black image cannot blow it up); decodes clamped to
    [-1, 1], no_grad, eval mode. 0 is perfect; a decoder that outputs zeros scores 1."""
    if not transforms:
        raise ValueError("equivariance_error needs at least one transform")
    errors = []
    with _eval_mode(vae):
        z = vae.encode(x).latent_dist.mode()
        for tau in transforms:
            z_t, target = tau.apply_pair(z, x)
            x_hat = vae.decode(z_t).sample.clamp(-1, 1)
            errors.append(((x_hat.float() - target.float()).pow(2).sum() / target.float().pow(2).sum()).item())
    return sum(errors) / len(errors)


# ---- latent statistics (spec 5) ------------------------------------------------------------------------------


class LatentMoments:
    """Per-channel moments of latents (B, C, h, w) over every B*h*w position, in float64: count, sum and sum
    of squares, each (C,). Partials from several workers combine with `merge`, or with a sum all-reduce of
    `to_tensor()` (then `from_tensor`); mean_std() gives the population values mu_c = sum / n and
    sigma_c = sqrt(sumsq / n - mu_c^2) (spec 5)."""

    def __init__(self, channels: int | None = None) -> None:
        self.count = self.sum = self.sumsq = None  # (C,) float64 each, allocated by the first update
        if channels is not None:
            self.count, self.sum, self.sumsq = torch.zeros(3, channels, dtype=torch.float64)

    def update(self, z: Tensor) -> LatentMoments:
        if z.ndim != 4:
            raise ValueError(f"expected latents (B, C, h, w), got shape {tuple(z.shape)}")
        flat = z.detach().to("cpu", torch.float64).transpose(0, 1).flatten(1)  # (C, B*h*w)
        return self._add(torch.full((flat.shape[0],), float(flat.shape[1]), dtype=torch.float64),
                         flat.sum(1), flat.pow(2).sum(1))

    def merge(self, other: LatentMoments) -> LatentMoments:
        return self._add(other.count, other.sum, other.sumsq) if other.count is not None else self

    def to_tensor(self, device: torch.device | str = "cpu") -> Tensor:
        """(3, C) float64 rows count, sum, sumsq: sum these across workers (e.g. dist.all_reduce; put them on
        the GPU for NCCL), then `from_tensor`."""
        if self.count is None:
            raise ValueError("no latents accumulated: pass channels= to pack an empty partial")
        return torch.stack([self.count, self.sum, self.sumsq]).to(device)

    @classmethod
    def from_tensor(cls, packed: Tensor) -> LatentMoments:
        if packed.ndim != 2 or packed.shape[0] != 3:
            raise ValueError(f"expected a (3, C) tensor of count, sum, sumsq, got shape {tuple(packed.shape)}")
        moments = cls()
        moments.count, moments.sum, moments.sumsq = packed.detach().to("cpu", torch.float64).clone()
        return moments

    def _add(self, count: Tensor, total: Tensor, sumsq: Tensor) -> LatentMoments:
        if self.count is None:
            self.count, self.sum, self.sumsq = (torch.zeros_like(total) for _ in range(3))
        if total.shape != self.sum.shape:
            raise ValueError(f"channel count {total.numel()} != {self.sum.numel()}")
        self.count, self.sum, self.sumsq = self.count + count, self.sum + total, self.sumsq + sumsq
        return self

    def mean_std(self) -> tuple[list[float], list[float]]:
        if self.count is None or not bool((self.count > 0).all()):
            raise ValueError("no latents accumulated")
        mean = self.sum / self.count
        var = (self.sumsq / self.count - mean.pow(2)).clamp_min(0.0)
        return mean.tolist(), var.sqrt().tolist()


def latent_moments(vae: AutoencoderKL, batches: Iterable[Tensor], *, sample: bool = True,
                   generator: torch.Generator | None = None) -> LatentMoments:
    """Moments of the latents of image batches (B, 3, H, W) in [-1, 1], encoded as the diffusion stage does:
    a posterior sample (sample=True, as HDM trains) or its mode. no_grad, eval mode."""
    moments = LatentMoments()
    with _eval_mode(vae):
        for x in batches:
            posterior = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
            if sample:
                noise_device = generator.device if generator is not None else posterior.mean.device
                eps = torch.randn(posterior.mean.shape, generator=generator, device=noise_device)
                z = posterior.mean + posterior.std * eps.to(posterior.mean.device, posterior.mean.dtype)
            else:
                z = posterior.mode()
            moments.update(z)
    return moments


def set_latent_stats(vae: AutoencoderKL, mean: Sequence[float], std: Sequence[float]) -> None:
    """Write per-channel `latents_mean` / `latents_std` into the diffusers config, so `save_pretrained` stores
    them and `hdm_model.vae.latent_stats` / `LatentVAE` normalise with them."""
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    channels = vae.config.latent_channels
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"need {channels} values each, got {len(mean)} means and {len(std)} stds")
    if not all(math.isfinite(m) for m in mean) or not all(math.isfinite(s) and s > 0 for s in std):
        raise ValueError(f"latent stats must be finite with std > 0, got mean {mean}, std {std}")
    vae.register_to_config(latents_mean=mean, latents_std=std)
