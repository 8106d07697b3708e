"""The stages of the latent precompute (pipelines/data/precompute.py runs them as a Ray Data job): read ->
decode/validate/resize -> [caption] -> VAE encode -> write.

Every stage passes one table schema (`STREAM_SCHEMA`); rows are either items or errors, and errors ride
along to the writer, so a bad input costs one errors/ row and never stops the job. Plain callables: Ray runs
them as tasks or actors, and the EQ-VAE job (pipelines/train/eqvae.py) reuses the read and prepare stages.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
from ray.data.block import BlockAccessor

from pipelines.cluster import CoreShare, cpu_threads
from pipelines.config import S3Options
from pipelines.data.attempts import JournalSpec, guarded
from pipelines.data.images import ImageError, TransformSpec, decode_image, resize_for_resolution, thumbnail
from pipelines.data.latent_store import LatentWriter, ReasonCode
from pipelines.data.sources import Unit, error, read_unit
from pipelines.faults import inject
from pipelines.storage import node_copy

STREAM_SCHEMA = pa.schema([
    ("kind", pa.string()), ("key", pa.string()), ("source", pa.string()), ("data", pa.binary()),
    ("caption", pa.string()), ("caption_source", pa.string()), ("todo", pa.list_(pa.int32())),
    ("sha256", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("res", pa.list_(pa.int32())), ("pixels", pa.list_(pa.binary())),
    ("pix_h", pa.list_(pa.int32())), ("pix_w", pa.list_(pa.int32())), ("thumb", pa.binary()),
    ("stage", pa.string()), ("reason_code", pa.string()), ("reason", pa.string()), ("err_res", pa.int32()),
])


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


@dataclass
class ReadStage:
    """Task: the rows of a batch of units, each item with the sha256 of its bytes and the resolutions it still
    needs (`todo`); a row needing none is dropped."""

    fs: Any
    resolutions: list[int]
    done: Any  # {res: {key: sha256 its latent row was made from, or None: an error row}} (latent_store.done_keys)

    def __call__(self, units: pa.Table) -> pa.Table:
        done = ray.get(self.done) if isinstance(self.done, ray.ObjectRef) else self.done
        rows = []
        for unit in units.to_pylist():
            for row in read_unit(self.fs, Unit(**unit)):
                if row["kind"] == "item":
                    row["sha256"] = hashlib.sha256(row["data"]).hexdigest()
                todo = [r for r in self.resolutions if _needed(done[r], row["key"], row.get("sha256"))]
                if todo:
                    rows.append({**row, "todo": todo})
        return _table(rows, STREAM_SCHEMA)


def _needed(done: dict[str, str | None], key: str, sha256: str | None) -> bool:
    """Whether `key` is still to do at a resolution: it has no row there yet, or its latent was made from other
    bytes than these (an error row stays done: the input failed, it is not retried)."""
    if key not in done:
        return True
    return sha256 is not None and done[key] is not None and done[key] != sha256


@dataclass
class PrepareStage:
    spec: TransformSpec
    max_pixels: int
    want_thumbnail: bool
    journal: JournalSpec | None = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        items = [r for r in rows if r["kind"] == "item"]
        out = [r for r in rows if r["kind"] != "item"]
        out += guarded(self.journal, "prepare", items, self._prepare_all, crashed=_crashed("prepare"))
        return _table(out, STREAM_SCHEMA)

    def _prepare_all(self, items: list[dict]) -> list[dict]:
        return [out for row in items for out in self.prepare(row)]

    def prepare(self, row: dict) -> list[dict]:
        """Decoded and resized pixels of one item at each resolution it needs; error rows for what fails
        (any error after decode too: a transform that raises costs this image, never the job)."""
        data, row = row["data"], {**row, "data": None}
        try:
            img = decode_image(data, max_pixels=self.max_pixels)
        except ImageError as e:
            return [error(row["key"], row["source"], stage="decode", code=e.code, detail=e.detail)]
        inject("prepare.kill", [row["key"]])  # a worker that dies on an image: the crash journal's case
        try:
            inject("prepare.raise", [row["key"]])
            return self._resize(row, img)
        except Exception as e:  # noqa: BLE001 - EXIF, mode or resize trouble: this image only
            return [error(row["key"], row["source"], stage="resize", code=ReasonCode.TRANSFORM_FAILED,
                          detail=f"{type(e).__name__}: {e}")]

    def _resize(self, row: dict, img) -> list[dict]:
        errors, res, pixels, hs, ws = [], [], [], [], []
        for r in row["todo"]:
            try:
                arr = resize_for_resolution(img, r, self.spec)
            except ImageError as e:
                errors.append(error(row["key"], row["source"], stage="resize", code=e.code, detail=e.detail, res=r))
                continue
            res.append(r), pixels.append(arr.tobytes()), hs.append(arr.shape[0]), ws.append(arr.shape[1])
        if not res:
            return errors
        row.update(width=img.width, height=img.height, res=res, pixels=pixels, pix_h=hs, pix_w=ws,
                   thumb=thumbnail(img) if self.want_thumbnail else None)
        return [row, *errors]


def _crashed(stage: str, *, encoded: bool = False):
    """The error rows of an item that killed its `stage` worker on every attempt (attempts.guarded); `encoded`:
    as the encoder emits them (OUTPUT_SCHEMA's `res`), one for each resolution the item was to be encoded at."""
    def rows_of(row: dict, detail: str) -> list[dict]:
        if not encoded:
            return [error(row["key"], row["source"], stage=stage, code=ReasonCode.WORKER_CRASHED, detail=detail)]
        return [{**error(row["key"], row["source"], stage=stage, code=ReasonCode.WORKER_CRASHED, detail=detail,
                         res=r), "res": r} for r in row["res"]]
    return rows_of


class CaptionStage:
    """Actor: generates captions from thumbnails and merges them with the input's. A batch the captioner fails
    on is captioned image by image; an image that fails alone is an error row CAPTION_FAILED."""

    def __init__(self, model: str, policy: str, max_new_tokens: int, use_gpu: bool, *,
                 journal: JournalSpec | None = None):
        import io

        from PIL import Image

        from pipelines.data.captioning import Captioner, merge_caption

        self._open = lambda b: Image.open(io.BytesIO(b)).convert("RGB")
        self._merge, self.policy, self.journal = merge_caption, policy, journal
        self.captioner = Captioner(model, device="cuda" if use_gpu else "cpu", max_new_tokens=max_new_tokens)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out = [r for r in rows if r["kind"] != "item"]
        items = [r for r in rows if r["kind"] == "item"]
        out += guarded(self.journal, "caption", items, self._caption_or_split, crashed=_crashed("caption"))
        return _table(out, STREAM_SCHEMA)

    def _caption_or_split(self, items: list[dict]) -> list[dict]:
        try:
            return self._caption(items)
        except Exception as e:  # noqa: BLE001 - find the image it fails on; the others keep their captions
            self.captioner.free_cache()
            if len(items) == 1:
                return [error(items[0]["key"], items[0]["source"], stage="caption", code=ReasonCode.CAPTION_FAILED,
                              detail=f"{type(e).__name__}: {e}")]
            return [out for row in items for out in self._caption_or_split([row])]

    def _caption(self, items: list[dict]) -> list[dict]:
        keys = [r["key"] for r in items]
        inject("caption.kill", keys)
        inject("caption.raise", keys)
        generated = self.captioner([self._open(r["thumb"]) for r in items])
        done = []
        for row, text in zip(items, generated):
            appended = self.policy == "append" and bool(row["caption"].strip())
            done.append({**row, "caption": self._merge(row["caption"], text, self.policy),
                         "caption_source": f"{row['caption_source']}+model" if appended else "model", "thumb": None})
        return done


class EncodeStage:
    """Actor: VAE-encodes every (item, resolution) of a batch, images of equal size together
    (pipelines/data/encode.py, which runs without Ray)."""

    def __init__(self, vae: str, use_gpu: bool, threads: int | None, actors: int, batch_size: int, store_std: bool,
                 *, s3: S3Options = S3Options(), journal: JournalSpec | None = None):
        import torch

        from pipelines.data.encode import BatchEncoder

        # Ray pins workers to one thread; a CPU encoder takes `threads`, else its share of the node's cores to
        # start with, then before each group the cores the rest of the node leaves idle (CoreShare)
        share = None
        if not use_gpu:
            torch.set_num_threads(cpu_threads(actors, threads))
            share = CoreShare(torch.get_num_threads()) if threads is None else None
        self.encode = BatchEncoder(node_copy(vae, s3), device="cuda" if use_gpu else "cpu", batch_size=batch_size,
                                   store_std=store_std, threads=share.update if share else None)
        self.journal = journal

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipelines.data.latent_store import OUTPUT_SCHEMA

        rows = batch.to_pylist()
        out = [{**r, "res": r["err_res"]} for r in rows if r["kind"] == "error"]
        items = [r for r in rows if r["kind"] == "item"]
        out += guarded(self.journal, "encode", items, self.encode.rows, crashed=_crashed("encode", encoded=True))
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)


class LatentDatasink(ray.data.Datasink):
    def __init__(self, fs, root: str, rows_per_file: int):
        self.writer = LatentWriter(fs, root)
        self.rows_per_file = rows_per_file
        self.stats: dict[str, Counter] = {"rows": Counter(), "errors": Counter()}

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks, ctx) -> dict:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"rows": Counter(), "errors": Counter()}
        return self.writer.write(pa.concat_tables(tables))

    def on_write_complete(self, write_result) -> None:
        for stats in write_result.write_returns:
            self.stats["rows"].update(stats["rows"])
            self.stats["errors"].update(stats["errors"])
