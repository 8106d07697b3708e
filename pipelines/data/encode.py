"""The precompute job's VAE encoding of one batch of the stream, without Ray: `EncodeStage`
(pipelines/data/stages.py) runs it as a Ray Data actor, benchmarks/gpu_check.py times it on one GPU."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from pipelines.data.latent_store import OUTPUT_SCHEMA, ReasonCode
from pipelines.data.sources import error
from pipelines.faults import inject


class BatchEncoder:
    """VAE-encodes every (item, resolution) of a stream batch, images of equal size together, into latent
    rows (OUTPUT_SCHEMA); error rows pass through with their resolution. `threads()`, when given, is the
    torch thread count to take before each group of equal-size images (a CPU encoder's CoreShare)."""

    def __init__(self, vae: str, *, device: str, batch_size: int, store_std: bool,
                 threads: Callable[[], int] | None = None):
        from hdm_model import LatentVAE

        self.device, self.store_std, self.threads = device, store_std, threads
        self.vae = LatentVAE.from_pretrained(vae, device=device, chunk_size=batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out = [{**r, "res": r["err_res"]} for r in rows if r["kind"] == "error"]
        out += self.rows([r for r in rows if r["kind"] == "item"])
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)

    def rows(self, items: list[dict]) -> list[dict]:
        """Latent rows (OUTPUT_SCHEMA dicts) of every (item, resolution), equal sizes encoded together; an image
        the VAE fails on even alone is an error row ENCODE_FAILED at that resolution (`encode_or_split`)."""
        by_size: dict[tuple[int, int], list] = {}
        for row in items:
            for r, pix, h, w in zip(row["res"], row["pixels"], row["pix_h"], row["pix_w"]):
                by_size.setdefault((h, w), []).append((row, r, np.frombuffer(pix, np.uint8).reshape(h, w, 3)))
        out = []
        for (h, w), group in by_size.items():
            if self.threads is not None:
                torch.set_num_threads(self.threads())
            out.extend(self.encode_or_split(group, h=h, w=w))
        return out

    def encode_or_split(self, group: list[tuple[dict, int, np.ndarray]], *, h: int, w: int) -> list[dict]:
        """`encode_group`; a group that raises (out of memory included) is split in halves and each half tried
        again, down to single images: one bad image, or a batch too big for the device, costs no other image."""
        try:
            keys = [row["key"] for row, _, _ in group]
            inject("encode.kill", keys)
            inject("encode.oom", keys)
            return self.encode_group(group, h=h, w=w)
        except Exception as e:  # noqa: BLE001 - torch.OutOfMemoryError is an Exception too
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            if len(group) == 1:
                row, r, _ = group[0]
                err = error(row["key"], row["source"], stage="encode", code=ReasonCode.ENCODE_FAILED,
                            detail=f"{type(e).__name__}: {e}", res=r)
                return [{**err, "res": r}]
            half = len(group) // 2
            return self.encode_or_split(group[:half], h=h, w=w) + self.encode_or_split(group[half:], h=h, w=w)

    def encode_group(self, group: list[tuple[dict, int, np.ndarray]], *, h: int, w: int) -> list[dict]:
        """The latent rows of (row, resolution, HxWx3 uint8 pixels) jobs of one image size."""
        images = torch.from_numpy(np.stack([j[2] for j in group])).to(self.device)
        images = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        mean, std = self.vae.encode(images)
        mean, std = mean.half().cpu().numpy(), std.half().cpu().numpy()
        return [{"kind": "latent", "res": r, "key": row["key"], "sha256": row["sha256"], "source": row["source"],
                 "caption": row["caption"], "caption_source": row["caption_source"], "width": row["width"],
                 "height": row["height"], "resized_width": w, "resized_height": h, "aspect": w / h,
                 "latent": m.tobytes(), "latent_shape": list(m.shape),
                 "latent_std": s.tobytes() if self.store_std else None}
                for (row, r, _), m, s in zip(group, mean, std)]
