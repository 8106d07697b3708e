"""Synthetic latent datasets in the precompute job's format (no VAE run needed)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from pipelines.config import S3Options
from pipelines.data.latent_store import OUTPUT_SCHEMA, LatentWriter
from pipelines.storage import resolve

CLASSES = {"a red square on white": 1.0, "a blue circle on black": -1.0}


def make_latent_dataset(root: str, resolutions: list[int], n: int, *, vae: str, seed: int = 0,
                        s3: S3Options = S3Options()) -> float:
    """Returns E[z^2] over every latent element. n images per resolution in two visually distinct classes: channel 0 of the latent is +1.5 or -1.5
    in a centred blob (the class), plus noise; captions name the class. Wide and tall images included."""
    fs, path = resolve(root, s3)
    rng = np.random.default_rng(seed)
    writer = LatentWriter(fs, path)
    captions = list(CLASSES)
    squares: list[float] = []
    for res in resolutions:
        rows = []
        for i in range(n):
            caption = captions[i % 2]
            h, w = (res // 8, res // 8 * 3 // 2) if i % 3 == 1 else (res // 8, res // 8)
            if i % 3 == 2:
                h, w = w, h
            z = rng.normal(0, 0.3, (4, h, w)).astype(np.float32)
            yy, xx = np.mgrid[0:h, 0:w]
            blob = np.exp(-(((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 3)) ** 2))
            z[0] += 1.5 * CLASSES[caption] * blob
            z[1] += 0.5 * CLASSES[caption]
            squares.extend((z.astype(np.float16).astype(np.float32) ** 2).ravel().tolist())
            rows.append({"kind": "latent", "res": res, "key": f"img{i:04d}", "sha256": "", "source": "synthetic",
                         "caption": caption, "caption_source": "input", "width": w * 8, "height": h * 8,
                         "resized_width": w * 8, "resized_height": h * 8, "aspect": w / h,
                         "latent": z.astype(np.float16).tobytes(), "latent_shape": [4, h, w],
                         "latent_std": np.full((4, h, w), 0.05, np.float16).tobytes()})
        writer.write(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA))
    manifest = {"format": "hdm-latents/1", "vae": vae, "vae_config_sha256": "synthetic", "latent_mean": [0.0] * 4,
                "latent_std": [1.0] * 4, "transform": {}, "resolutions": resolutions, "store_std": True,
                "rows": {str(r): n for r in resolutions}, "errors": 0, "status": "complete"}
    with fs.open_output_stream(f"{path}/manifest.json") as f:
        f.write(json.dumps(manifest).encode())
    return float(np.mean(squares))
