"""Latent precompute as a Ray Data job: read -> decode/validate/resize -> [caption] -> VAE encode -> write.

Every stage passes one table schema (`STREAM_SCHEMA`); rows are either items or errors, and errors ride
along to the writer, so a bad input costs one errors/ row and never stops the job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray
from ray.data.block import BlockAccessor

from pipelines.cluster import CoreShare, cpu_threads
from pipelines.data.config import PrecomputeConfig
from pipelines.data.images import ImageError, TransformSpec, decode_image, resize_for_resolution, thumbnail
from pipelines.data.latent_store import (LatentWriter, ManifestMismatch, build_manifest, check_manifest,
                                         count_rows, done_keys, read_manifest, write_manifest)
from pipelines.data.sources import Unit, error, list_units, read_unit
from pipelines.storage import resolve

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


# ---------------------------------------------------------------------------------------------------
# Stages (plain callables; Ray runs them as tasks or actors)

@dataclass
class ReadStage:
    fs: Any
    resolutions: list[int]
    done: Any  # ObjectRef of {res: set(keys)}

    def __call__(self, units: pa.Table) -> pa.Table:
        done = ray.get(self.done) if isinstance(self.done, ray.ObjectRef) else self.done
        rows = []
        for unit in units.to_pylist():
            for row in read_unit(self.fs, Unit(**unit)):
                todo = [r for r in self.resolutions if row["key"] not in done[r]]
                if todo:
                    rows.append({**row, "todo": todo})
        return _table(rows, STREAM_SCHEMA)


@dataclass
class PrepareStage:
    spec: TransformSpec
    max_pixels: int
    want_thumbnail: bool

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for row in batch.to_pylist():
            out.extend(self.prepare(row) if row["kind"] == "item" else [row])
        return _table(out, STREAM_SCHEMA)

    def prepare(self, row: dict) -> list[dict]:
        data, row = row["data"], {**row, "data": None}
        try:
            img = decode_image(data, max_pixels=self.max_pixels)
        except ImageError as e:
            return [error(row["key"], row["source"], stage="decode", code=e.code, detail=e.detail)]
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
        row.update(sha256=hashlib.sha256(data).hexdigest(), width=img.width, height=img.height, res=res,
                   pixels=pixels, pix_h=hs, pix_w=ws, thumb=thumbnail(img) if self.want_thumbnail else None)
        return [row, *errors]


class CaptionStage:
    """Actor: generates captions from thumbnails and merges them with the input's."""

    def __init__(self, model: str, policy: str, max_new_tokens: int, use_gpu: bool):
        import io

        from PIL import Image

        from pipelines.data.captioning import Captioner, merge_caption

        self._open = lambda b: Image.open(io.BytesIO(b)).convert("RGB")
        self._merge, self.policy = merge_caption, policy
        self.captioner = Captioner(model, device="cuda" if use_gpu else "cpu", max_new_tokens=max_new_tokens)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        items = [r for r in rows if r["kind"] == "item"]
        if items:
            generated = self.captioner([self._open(r["thumb"]) for r in items])
            for row, text in zip(items, generated):
                appended = self.policy == "append" and bool(row["caption"].strip())
                row["caption"] = self._merge(row["caption"], text, self.policy)
                row["caption_source"] = f"{row['caption_source']}+model" if appended else "model"
                row["thumb"] = None
        return _table(rows, STREAM_SCHEMA)


class EncodeStage:
    """Actor: VAE-encodes every (item, resolution) of a batch, images of equal size together
    (pipelines/data/encode.py, which runs without Ray)."""

    def __init__(self, vae: str, use_gpu: bool, threads: int | None, actors: int, batch_size: int, store_std: bool):
        import torch

        from pipelines.data.encode import BatchEncoder

        # Ray pins workers to one thread; a CPU encoder takes `threads`, else its share of the node's cores to
        # start with, then before each group the cores the rest of the node leaves idle (CoreShare)
        share = None
        if not use_gpu:
            torch.set_num_threads(cpu_threads(actors, threads))
            share = CoreShare(torch.get_num_threads()) if threads is None else None
        self.encode = BatchEncoder(vae, device="cuda" if use_gpu else "cpu", batch_size=batch_size,
                                   store_std=store_std, threads=share.update if share else None)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.encode(batch)


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


# ---------------------------------------------------------------------------------------------------
# The job

@dataclass
class PrecomputeSummary:
    output: str
    inputs_listed: int
    rows: dict[int, int] = field(default_factory=dict)  # written by this run
    errors: dict[str, int] = field(default_factory=dict)  # by reason_code, this run
    seconds: float = 0.0
    totals: dict[str, Any] = field(default_factory=dict)  # the whole output, as in the manifest

    def images_per_second(self) -> float:
        return max(self.rows.values(), default=0) / self.seconds if self.seconds else 0.0

    def format(self) -> str:
        lines = [f"precompute -> {self.output}: {self.inputs_listed} units listed, {self.seconds:.1f} s, "
                 f"{self.images_per_second():.2f} images/s",
                 "  rows written this run: " + (", ".join(f"res={r}: {n}" for r, n in sorted(self.rows.items())) or "none"),
                 "  errors this run: " + (", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items())) or "none"),
                 f"  dataset totals: rows {self.totals.get('rows')}, errors {self.totals.get('errors', 0)}"]
        return "\n".join(lines)


def run_precompute(config: PrecomputeConfig) -> PrecomputeSummary:
    """Run the job on the Ray cluster this process is connected to (ray.init() is the caller's)."""
    from diffusers import AutoencoderKL

    from hdm_model.vae import latent_stats

    start = time.perf_counter()
    in_fs, in_root = resolve(config.input, config.s3)
    out_fs, out_root = resolve(config.output, config.s3)
    spec = TransformSpec(max_aspect=config.max_aspect)

    vae_config = AutoencoderKL.load_config(config.vae)
    mean, std = latent_stats(vae_config)
    manifest = build_manifest(vae=config.vae, vae_config=vae_config, latent_mean=mean.tolist(),
                              latent_std=std.tolist(), transform=spec.to_dict(), resolutions=config.resolutions,
                              store_std=config.store_std)
    existing = read_manifest(out_fs, out_root)
    if existing is not None:
        check_manifest(existing, manifest)
        manifest["resolutions"] = sorted(set(existing["resolutions"]) | set(config.resolutions))
    fmt, units = list_units(in_fs, in_root, config.input_format)
    write_manifest(out_fs, out_root, {**manifest, "status": "running"})
    done = done_keys(out_fs, out_root, config.resolutions)
    if fmt == "folder":  # keys are known before reading: skip finished files without touching them
        units = [u for u in units if any(u.key not in done[r] for r in config.resolutions)]
    print(f"precompute: {len(units)} {fmt} units to read from {config.input}; "
          f"already done: " + ", ".join(f"res={r}: {len(k)}" for r, k in done.items()), flush=True)

    summary = PrecomputeSummary(output=config.output, inputs_listed=len(units))
    if units:
        sink = LatentDatasink(out_fs, out_root, config.rows_per_file)
        _build_dataset(config, in_fs, units, fmt, done, spec).write_datasink(sink, ray_remote_args={"num_cpus": 0.5})
        summary.rows = {int(r): n for r, n in sink.stats["rows"].items()}
        summary.errors = dict(sink.stats["errors"])

    summary.totals = count_rows(out_fs, out_root, manifest["resolutions"])
    write_manifest(out_fs, out_root, {**manifest, **summary.totals, "status": "complete"})
    summary.seconds = time.perf_counter() - start
    return summary


# CPU encoders: torch's allocator takes 2 MiB-aligned transparent huge pages for large tensors. A VAE encode
# allocates and frees activations of tens of MB per layer; glibc hands them back to the kernel and every reuse
# faults them in again 4 KiB at a time: SDXL-size VAE, 256 px, one thread, 4 images: 0.97M page faults and 3.1 s
# of 25.6 s in the kernel; with it 57k and 1.7 s; two such processes side by side, twice: 7% faster
CPU_ENCODER_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def default_encoders(resources: dict, gpus_per_encoder: float, *, cpu_captioners: int, blocks: int) -> int:
    """One encoder per GPU, or on CPU one per core not taken by a captioner; never more than the input has
    blocks (a shard is read as one block, which one encoder takes whole: the demo's single shard of 2000
    images kept a second CPU encoder starting up for nothing)."""
    if gpus_per_encoder:
        wanted = int(resources.get("GPU", 0) // gpus_per_encoder)
    else:
        wanted = int(resources.get("CPU", 1.0)) - cpu_captioners
    return max(1, min(wanted, blocks))


def _build_dataset(config: PrecomputeConfig, fs, units: list[Unit], fmt: str, done: dict, spec: TransformSpec):
    resources = ray.cluster_resources()
    gpus = config.gpus_per_encoder
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) > 0 else 0.0
    # CPU encoders' environment; read and decode get it too, so that Ray Data can still fuse them into the encoder
    runtime_env = None if gpus else {"env_vars": CPU_ENCODER_ENV}
    ds = ray.data.from_items([dataclasses.asdict(u) for u in units])
    # a folder is read one encoder batch of files per task: each block then feeds one encoder call, so several
    # encoders share the work evenly (16 files per block left all of a small job to one encoder)
    ds = ds.map_batches(ReadStage(fs, config.resolutions, ray.put(done)), batch_format="pyarrow",
                        batch_size=1 if fmt != "folder" else config.batch_size, num_cpus=0.5,
                        runtime_env=runtime_env)
    if config.limit is not None:
        ds = ds.limit(config.limit)
    captioning = config.caption.mode == "model"
    ds = ds.map_batches(PrepareStage(spec, config.max_pixels, want_thumbnail=captioning), batch_format="pyarrow",
                        batch_size=4, num_cpus=0.5, runtime_env=runtime_env)
    if captioning:
        cap = config.caption
        cap_gpu = cap.gpus_per_actor > 0
        ds = ds.map_batches(CaptionStage, fn_constructor_kwargs=dict(model=cap.model, policy=cap.policy,
                                                                     max_new_tokens=cap.max_new_tokens,
                                                                     use_gpu=cap_gpu),
                            compute=ray.data.ActorPoolStrategy(size=cap.actors), batch_size=cap.batch_size,
                            batch_format="pyarrow", num_gpus=cap.gpus_per_actor or None, num_cpus=0.5)
    # one encoder per GPU; on CPU one per core, one torch thread each while all are busy
    # (benchmarks/bench_precompute.py, idle 2-core machine, SDXL-size VAE: two 1-thread processes side by side
    # encoded 16 images in 100 core-seconds, one process on 2 threads in 109, so 2 x 1 thread wins even after
    # the ~0.1-0.2 core of Ray's own processes; 1 x 2 threads ran 0.83 / 0.95 / 0.86x the plain loop)
    cpu_captioners = config.caption.actors if captioning and not config.caption.gpus_per_actor else 0
    blocks = len(units) if fmt != "folder" else math.ceil(len(units) / config.batch_size)
    actors = config.encoders or default_encoders(resources, gpus, cpu_captioners=cpu_captioners, blocks=blocks)
    cpus, in_flight = 1.0, None  # unlike the tasks' 0.5: no fusion
    if not gpus:  # CPU encoders use their share of the cores (torch threads) whatever they ask for: ask for less
        # than a CPU each where needed, so that one encoder per core still leaves a read/decode task and a write
        # task room to run beside them (when the request equals the tasks' 0.5, Ray Data fuses read and decode
        # into the encoder: fine on CPU, where they would only share its cores)
        spare = resources.get("CPU", 1.0) - 1.0 - (0.5 * config.caption.actors if captioning else 0)
        cpus = min(1.0, max(spare, 0.1) / actors)
        # a CPU encoder takes seconds a batch: give it the next one only when it is free, so that the last
        # batches go to whichever encoder is free rather than wait in another's queue
        in_flight = 1
    return ds.map_batches(EncodeStage, fn_constructor_kwargs=dict(vae=config.vae, use_gpu=gpus > 0,
                                                                 threads=config.threads_per_encoder,
                                                                 actors=actors,
                                                                 batch_size=config.batch_size,
                                                                 store_std=config.store_std),
                          compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=in_flight),
                          batch_size=config.batch_size,
                          batch_format="pyarrow", num_gpus=gpus or None, num_cpus=cpus, runtime_env=runtime_env)


__all__ = ["run_precompute", "PrecomputeSummary", "ManifestMismatch", "default_encoders"]
