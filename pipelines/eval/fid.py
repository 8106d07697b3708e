"""Frechet Inception distance: how far the Inception-v3 pool features of generated images lie from those of a
reference set, each summarised as a Gaussian (mean, covariance).

    FID = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

The value depends on the number of images (a small sample's covariance is biased): compare FIDs only at equal
counts. The reference set's statistics are cached as npz, keyed by its file list and the Inception weights, so
each stage of a pipeline computes them once.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow.fs as pafs
import torch
from PIL import Image

from pipelines.config import S3Options
from pipelines.eval.inception import InceptionV3
from pipelines.storage import cache_dir, read_bytes, resolve

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_VERSION = 1  # bump when the features change for the same files and weights (resizing, scaling)


@dataclass(frozen=True)
class Statistics:
    mu: np.ndarray  # (2048,)
    sigma: np.ndarray  # (2048, 2048)
    count: int  # images they were computed from


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (covariances symmetric PSD).

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), a symmetric
    PSD matrix with the same eigenvalues as S1 S2: the eigen route stays real and finite where sqrtm of the
    product does not (singular covariances, from fewer images than feature dimensions), so no imaginary
    parts to drop and no eps to add. Eigenvalues within rounding of zero count as zero: the square roots
    of 2000 rounding errors would add up to a visible bias."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: means {mu1.shape} {mu2.shape}, covariances {sigma1.shape} "
                         f"{sigma2.shape}")
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(_nonzero(w))) @ v.T  # S1^(1/2)
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(_nonzero(np.linalg.eigvalsh((inner + inner.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _nonzero(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those below the rounding tolerance (numpy's matrix_rank's) set to 0."""
    tolerance = max(eigenvalues.max(initial=0.0), 0.0) * len(eigenvalues) * np.finfo(np.float64).eps
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def statistics(features: np.ndarray) -> Statistics:
    """Mean and (unbiased) covariance of (N, D) features; N >= 2."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"FID needs features of at least 2 images, got shape {features.shape}")
    return Statistics(mu=features.mean(axis=0), sigma=np.cov(features, rowvar=False), count=len(features))


@torch.no_grad()
def pool_features(model: InceptionV3, images: Iterable[Image.Image], *, batch_size: int = 32) -> np.ndarray:
    """(N, 2048) Inception pool features of PIL images (any sizes), `batch_size` at a time."""
    device = next(model.parameters()).device
    images = iter(images)  # one batch of images in memory at a time
    chunks = [model(torch.stack([_tensor(image) for image in batch]).to(device)).double().cpu().numpy()
              for batch in iter(lambda: list(itertools.islice(images, batch_size)), [])]
    if not chunks:
        raise ValueError("no images to compute Inception features of")
    return np.concatenate(chunks)


def _tensor(image: Image.Image) -> torch.Tensor:
    """(3, 299, 299) RGB in [0, 1]: resized here so that images of different sizes stack."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    return torch.nn.functional.interpolate(pixels[None], size=(299, 299), mode="bilinear", align_corners=False)[0]


def fid(images: Iterable[Image.Image], *, model: InceptionV3, reference: Statistics, batch_size: int = 32) -> float:
    """FID of `images` against the reference statistics."""
    own = statistics(pool_features(model, images, batch_size=batch_size))
    return frechet_distance(own.mu, own.sigma, reference.mu, reference.sigma)


def reference_statistics(reference: str, *, model: InceptionV3, s3: S3Options = S3Options(),
                         cache_dir: str | os.PathLike | None = None, batch_size: int = 32) -> Statistics:
    """Statistics of the images of the folder `reference` (local or s3://, recursive), read from the cache
    when the same files (names and sizes) were seen with the same weights and variant, else computed and
    cached. `cache_dir`: default $XDG_CACHE_HOME/hdm/fid (~/.cache/hdm/fid)."""
    fs, root = resolve(reference, s3)
    files = reference_files(fs, root)
    if len(files) < 2:
        raise FileNotFoundError(f"the FID reference {reference} holds {len(files)} images ({', '.join(IMAGE_SUFFIXES)})"
                                ": give a folder of at least 2, ideally thousands")
    listing = [(PurePosixPath(path).relative_to(root).as_posix(), size) for path, size in files]
    key = hashlib.sha256(json.dumps([CACHE_VERSION, model.weights_digest, model.variant, listing]).encode())
    cache = Path(cache_dir or default_cache_dir()) / f"{key.hexdigest()[:32]}.npz"
    if cache.is_file():
        with np.load(cache) as stored:
            return Statistics(mu=stored["mu"], sigma=stored["sigma"], count=int(stored["count"]))
    stats = statistics(pool_features(model, _read_images(fs, [p for p, _ in files]), batch_size=batch_size))
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache.parent, suffix=".npz", delete=False) as tmp:
        np.savez(tmp, mu=stats.mu, sigma=stats.sigma, count=stats.count)
    os.replace(tmp.name, cache)  # a concurrent stage never reads a partial file
    return stats


def reference_files(fs: pafs.FileSystem, root: str) -> list[tuple[str, int]]:
    """(path, size) of every image under `root`, sorted, hidden files left out."""
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no folder at {root} (the FID reference: a folder of images)")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted((i.path, i.size) for i in infos if i.type == pafs.FileType.File
                  and PurePosixPath(i.path).suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in PurePosixPath(i.path[len(root):]).parts))


def _read_images(fs: pafs.FileSystem, paths: list[str]) -> Iterator[Image.Image]:
    for path in paths:
        with Image.open(io.BytesIO(read_bytes(fs, path))) as image:
            yield image.convert("RGB")


def default_cache_dir() -> Path:
    return cache_dir("fid")
