"""Demo images for the detector's tests and benchmark: clean ones drawn by the demo's own generator, the same
perturbed as generated images are (blur, halo, tinted background, noise), and reconstructions by a demo VAE.

Each case is (image (H, W, 3) uint8, Scene). Perturbations take the clean image and the shape's mask (the
pixels that differ from the flat background: `render` draws without anti-aliasing) and a numpy Generator.
Sizes scale with the image side (`s` = side / 64), so 32 px images get half as wide a blur or ring.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipelines.data.demo_data import Scene, all_scenes, render


def clean_cases(*, size: int = 64, per_scene: int = 4, seed: int = 0) -> list[tuple[np.ndarray, Scene]]:
    """`per_scene` images of every colour x shape x background (random size and position, as in training)."""
    rng = np.random.default_rng(seed)
    return [(np.asarray(render(scene, size, rng)), scene) for scene in all_scenes() for _ in range(per_scene)]


def shape_mask(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels that differ from the clean image's flat background (its corner pixel)."""
    return np.any(image != image[0, 0], axis=-1)


def _finish(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def _blur(pixels: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(pixels.astype(np.float64), sigma=(sigma, sigma, 0))


def blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A Gaussian blur of 0.8-2 px (at 64 px): soft edges and rounded corners, as a VAE decoder draws them."""
    return _finish(_blur(image, rng.uniform(0.8, 2.0) * image.shape[0] / 64))


def halo(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A faint soft ring 2-5 px wide (at 64 px) around the shape's edge: lighter, darker, or an echo of the
    shape's colour, 15-35 % as far from the background as the shape is (the rings generated images show);
    then a slight blur (0.7 px) so the shape's edge is soft too."""
    mask, s = shape_mask(image), image.shape[0] / 64
    background = image[0, 0].astype(np.float64)
    shape_rgb = np.median(image[mask], axis=0).astype(np.float64)
    toward = [np.full(3, 255.0), np.zeros(3), shape_rgb][int(rng.integers(3))]
    step = toward - background
    strength = rng.uniform(0.15, 0.35) * np.linalg.norm(shape_rgb - background)
    halo_rgb = background + step / max(np.linalg.norm(step), 1e-6) * strength
    ring = ndimage.binary_dilation(mask, iterations=max(1, round(rng.uniform(2, 5) * s))) & ~mask
    weight = np.clip(ndimage.gaussian_filter(ring.astype(np.float64), 0.8 * s), 0, 1)[..., None] * ~mask[..., None]
    pixels = image * (1 - weight) + halo_rgb * weight
    return _finish(_blur(pixels, 0.7 * s))


def tint(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The background tinted by a random colour 15-35 RGB units away, with a linear gradient of up to 20 more
    across the image (the greenish blacks and purplish greys of generated images); the shape kept as drawn."""
    mask, side = shape_mask(image), image.shape[0]
    cast = rng.normal(size=3)
    cast *= rng.uniform(15, 35) / np.linalg.norm(cast)
    ramp = np.linspace(-0.5, 0.5, side)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None])[..., None] * rng.uniform(0, 20)
    pixels = image.astype(np.float64) + (cast + gradient) * ~mask[..., None]
    return _finish(pixels)


def noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise, 5-15 per channel (0-255), independent per pixel and channel."""
    return _finish(image + rng.normal(scale=rng.uniform(5, 15), size=image.shape))


PERTURBATIONS = {"blur": blur, "halo": halo, "tint": tint, "noise": noise}


def perturbed(cases, name: str, *, seed: int = 0) -> list[tuple[np.ndarray, Scene]]:
    rng = np.random.default_rng(seed)
    return [(PERTURBATIONS[name](image, rng), scene) for image, scene in cases]


def reconstructed(vae, cases) -> list[tuple[np.ndarray, Scene]]:
    """Each image encoded (the posterior's mean) and decoded by `vae`, as the demo's samples are decoded."""
    import torch

    images = np.stack([image for image, _ in cases])
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        out = torch.cat([vae.decode(vae.encode(chunk).latent_dist.mean).sample for chunk in x.split(64)])
    pixels = ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [(image, scene) for image, (_, scene) in zip(pixels, cases)]
