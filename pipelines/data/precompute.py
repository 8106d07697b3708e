"""Latent precompute as a Ray Data job: read -> decode/validate/resize -> [caption] -> VAE encode -> write.

The stages are in pipelines/data/stages.py; here the job that wires them: the output's lease (one writer),
resume by key and source sha256, the manifest and its guards, the finishing dedupe pass, the summary, and the
progress lines (inputs written out of those to do, as the write tasks report them to a counter actor).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq
import ray
from ray.data.block import BlockAccessor

from pipelines import progress
from pipelines.data.attempts import JournalSpec, ray_retry_args
from pipelines.data.attempts import clear as clear_journal
from pipelines.data.config import PrecomputeConfig
from pipelines.data.images import TransformSpec
from pipelines.data.dedupe import dedupe
from pipelines.data.latent_store import (ManifestMismatch, build_manifest, check_manifest, count_rows, done_keys,
                                         read_manifest, vae_weights_digest, write_manifest)
from pipelines.data.sources import Unit, list_units
from pipelines.data.stages import CaptionStage, EncodeStage, LatentDatasink, PrepareStage, ReadStage
from pipelines.lease import Lease, default_holder
from pipelines.storage import node_copy, resolve

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
    recomputed: int = 0  # keys encoded again because their source bytes changed (stored sha256 differs)
    duplicates_removed: int = 0  # rows the finishing pass removed (dedupe): retried writes, replaced latents
    hidden_skipped: int = 0  # input files not read: their name, or a folder's, starts with "."

    def images_per_second(self) -> float:
        return max(self.rows.values(), default=0) / self.seconds if self.seconds else 0.0

    def format(self) -> str:
        lines = [f"precompute -> {self.output}: {self.inputs_listed} units listed, {self.seconds:.1f} s, "
                 f"{self.images_per_second():.2f} images/s",
                 "  rows written this run: " + (", ".join(f"res={r}: {n}" for r, n in sorted(self.rows.items())) or "none"),
                 "  errors this run: " + (", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items())) or "none"),
                 f"  recomputed (source changed): {self.recomputed}, duplicates removed: {self.duplicates_removed}, "
                 f"hidden files skipped: {self.hidden_skipped}",
                 f"  dataset totals: rows {self.totals.get('rows')}, errors {self.totals.get('errors', 0)}"]
        return "\n".join(lines)

    def last_run(self) -> dict[str, int]:
        """What the manifest records of this run besides the totals."""
        return {"recomputed_source_changed": self.recomputed, "duplicates_removed": self.duplicates_removed,
                "hidden_files_skipped": self.hidden_skipped}


def run_precompute(config: PrecomputeConfig) -> PrecomputeSummary:
    """Run the job on the Ray cluster this process is connected to (ray.init() is the caller's). The output's
    lease is held from before anything is written until the end (LeaseHeld: another job writes there)."""
    start = time.perf_counter()
    out_fs, out_root = resolve(config.output, config.s3)
    with Lease.acquire(out_fs, out_root, holder=default_holder(), ttl_s=config.lease_ttl_s) as lease:
        summary = _precompute(config, out_fs, out_root, lease)
    summary.seconds = time.perf_counter() - start
    return summary


def _precompute(config: PrecomputeConfig, out_fs, out_root: str, lease: Lease) -> PrecomputeSummary:
    in_fs, in_root = resolve(config.input, config.s3)
    spec = TransformSpec(max_aspect=config.max_aspect)
    manifest = _checked_manifest(config, spec, out_fs, out_root, input_uri=_uri(config.input, in_root))
    listing = list_units(in_fs, in_root, config.input_format)
    if listing.hidden:
        print(f'precompute: {listing.hidden} hidden files skipped (names starting with ".")', flush=True)
    write_manifest(out_fs, out_root, {**manifest, "status": "running"})
    journal = JournalSpec(out_fs, out_root, config.max_attempts)
    clear_journal(journal)  # marks of an earlier job that stopped (we hold the lease: no other job has any)
    done = done_keys(out_fs, out_root, config.resolutions)
    units = listing.units
    if listing.format == "folder":  # keys are known before reading: skip inputs that failed at every resolution
        # (a key with a latent is read again: its bytes may have changed since, ReadStage compares the sha256)
        units = [u for u in units if not all(done[r].get(u.key, "") is None for r in config.resolutions)]
    print(f"precompute: {len(units)} {listing.format} units to read from {config.input}; "
          f"already done: " + ", ".join(f"res={r}: {len(k)}" for r, k in done.items()), flush=True)

    summary = PrecomputeSummary(output=config.output, inputs_listed=len(units), hidden_skipped=listing.hidden)
    if units:
        counter = WrittenCounter.remote()
        sink = CountingDatasink(out_fs, out_root, config.rows_per_file, counter=counter)
        poll = written_progress(counter, total=lambda: inputs_to_do(in_fs, listing.format, units, done,
                                                                    limit=config.limit))
        try:
            with progress.Reporter(poll, unit="image"):
                _build_dataset(config, in_fs, units, listing.format, done, spec, journal).write_datasink(
                    sink, ray_remote_args={"num_cpus": 0.5})
        finally:
            ray.kill(counter)
        summary.rows = {int(r): n for r, n in sink.stats["rows"].items()}
        summary.errors = dict(sink.stats["errors"])

    lease.check()  # never finish an output another job took over
    summary.duplicates_removed = dedupe(out_fs, out_root, manifest["resolutions"])
    summary.recomputed = _changed(done, done_keys(out_fs, out_root, config.resolutions))
    summary.totals = count_rows(out_fs, out_root, manifest["resolutions"])
    lease.check()
    write_manifest(out_fs, out_root, {**manifest, **summary.totals, "last_run": summary.last_run(),
                                      "status": "complete"})
    return summary


# ---------------------------------------------------------------------------------------------------
# Progress: the write tasks count what they wrote, the driver polls the count (pipelines/progress.py)

@ray.remote(num_cpus=0)
class WrittenCounter:
    """Inputs whose rows (latents or errors) the write tasks have written."""

    def __init__(self):
        self.count = 0

    def add(self, count: int) -> None:
        self.count += count

    def get(self) -> int:
        return self.count


class CountingDatasink(LatentDatasink):
    """LatentDatasink that tells a WrittenCounter how many inputs (distinct keys) each write finished. A key's
    rows come out of one encoder batch together and Ray Data bundles whole blocks, so a key is one write's."""

    def __init__(self, fs, root: str, rows_per_file: int, *, counter):
        super().__init__(fs, root, rows_per_file)
        self.counter = counter

    def write(self, blocks, ctx) -> dict:
        # an empty block may have no columns at all
        tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]
        stats = super().write(tables, ctx)
        self.counter.add.remote(len({key for t in tables for key in t["key"].to_pylist()}))
        return stats


def written_progress(counter, *, total: Callable[[], int | None]) -> Callable[[], tuple[int, int | None]]:
    """The driver's poll for progress.Reporter: (inputs written, inputs to do). `total` runs once, on the first
    poll, in the reporter's thread: reading shard footers need not hold up the job."""
    total = functools.cache(total)

    def poll() -> tuple[int, int | None]:
        done, to_do = ray.get(counter.get.remote(), timeout=60), total()
        return done, None if to_do is None else max(to_do, done)  # a retried write counts its keys again
    return poll


def inputs_to_do(fs, fmt: str, units: list[Unit], done: dict[int, dict[str, str | None]], *,
                 limit: int | None) -> int | None:
    """Inputs this run will write, as far as the listing tells: a folder's files, or the rows of the shards'
    parquet footers (img2dataset's parquet, or a tar's metadata .parquet, which lists every sample), less the
    keys done at every resolution (read again but dropped unless their bytes changed); None when a tar has no
    metadata .parquet."""
    everywhere = set.intersection(*(set(keys) for keys in done.values()))
    if fmt == "folder":
        count = sum(unit.key not in everywhere for unit in units)
    else:
        rows = [_footer_rows(fs, unit.path if unit.kind == "parquet" else unit.sidecar) for unit in units]
        if None in rows:
            return None
        count = max(0, sum(rows) - len(everywhere))
    return count if limit is None else min(count, limit)


def _footer_rows(fs, path: str) -> int | None:
    """Rows of a parquet file by its footer; 1 when it cannot be read (the shard becomes one error row)."""
    if not path:
        return None
    try:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata.num_rows
    except Exception:  # noqa: BLE001 - the job reports the broken shard; here it is one input
        return 1


def _checked_manifest(config: PrecomputeConfig, spec: TransformSpec, out_fs, out_root: str, *,
                      input_uri: str) -> dict[str, Any]:
    """This run's manifest, checked against the stored one (ManifestMismatch: latents made differently)."""
    from diffusers import AutoencoderKL

    from hdm_model.vae import latent_stats

    vae = node_copy(config.vae, config.s3)  # s3://: this node's copy (other nodes' encoders make theirs)
    vae_config = AutoencoderKL.load_config(vae)
    mean, std = latent_stats(vae_config)
    manifest = build_manifest(vae=config.vae, vae_config=vae_config, latent_mean=mean.tolist(),
                              latent_std=std.tolist(), transform=spec.to_dict(), resolutions=config.resolutions,
                              store_std=config.store_std, vae_weights_sha256=vae_weights_digest(vae),
                              input=input_uri)
    existing = read_manifest(out_fs, out_root)
    if existing is not None:
        for note in check_manifest(existing, manifest, allow_code_change=config.allow_code_change,
                                   allow_input_change=config.allow_input_change):
            print(f"precompute: {note}", flush=True)
        manifest["resolutions"] = sorted(set(existing["resolutions"]) | set(config.resolutions))
    return manifest


def _uri(uri: str, root: str) -> str:
    """The input as the manifest records it: s3://bucket/prefix, or the absolute local path."""
    return f"s3://{root}" if uri.startswith("s3://") else root


def _changed(before: dict[int, dict[str, str | None]], after: dict[int, dict[str, str | None]]) -> int:
    """Keys whose latent was made from other source bytes than before this run (recomputed)."""
    return len({key for res, keys in before.items() for key, sha in keys.items()
                if sha is not None and after[res].get(key) != sha})


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


def _build_dataset(config: PrecomputeConfig, fs, units: list[Unit], fmt: str, done: dict, spec: TransformSpec,
                   journal: JournalSpec):
    """read -> prepare -> [caption] -> encode; the stages after read keep `journal` (pipelines/data/attempts.py)
    and every stage's retries are bounded, so an input that kills its worker ends as an error row."""
    resources = ray.cluster_resources()
    tasks, actors_retry = ray_retry_args(config.max_attempts, actor=False), ray_retry_args(config.max_attempts,
                                                                                          actor=True)
    gpus = config.gpus_per_encoder
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) > 0 else 0.0
    # CPU encoders' environment; read and decode get it too (Ray Data fuses operators only where their remote
    # args agree; the retry bounds of attempts.ray_retry_args differ between tasks and actors, which likely
    # keeps read and decode out of the encoder now: not measured)
    runtime_env = None if gpus else {"env_vars": CPU_ENCODER_ENV}
    ds = ray.data.from_items([dataclasses.asdict(u) for u in units])
    # a folder is read one encoder batch of files per task: each block then feeds one encoder call, so several
    # encoders share the work evenly (16 files per block left all of a small job to one encoder)
    ds = ds.map_batches(ReadStage(fs, config.resolutions, ray.put(done)), batch_format="pyarrow",
                        batch_size=1 if fmt != "folder" else config.batch_size, num_cpus=0.5,
                        runtime_env=runtime_env, **tasks)
    if config.limit is not None:
        ds = ds.limit(config.limit)
    captioning = config.caption.mode == "model"
    ds = ds.map_batches(PrepareStage(spec, config.max_pixels, want_thumbnail=captioning, journal=journal),
                        batch_format="pyarrow", batch_size=4, num_cpus=0.5, runtime_env=runtime_env, **tasks)
    if captioning:
        cap = config.caption
        cap_gpu = cap.gpus_per_actor > 0
        ds = ds.map_batches(CaptionStage, fn_constructor_kwargs=dict(model=cap.model, policy=cap.policy,
                                                                     max_new_tokens=cap.max_new_tokens,
                                                                     use_gpu=cap_gpu, journal=journal),
                            compute=ray.data.ActorPoolStrategy(size=cap.actors), batch_size=cap.batch_size,
                            batch_format="pyarrow", num_gpus=cap.gpus_per_actor or None, num_cpus=0.5,
                            **actors_retry)
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
    return ds.map_batches(EncodeStage, fn_constructor_kwargs=dict(vae=config.vae, s3=config.s3, use_gpu=gpus > 0,
                                                                 threads=config.threads_per_encoder,
                                                                 actors=actors,
                                                                 batch_size=config.batch_size,
                                                                 store_std=config.store_std, journal=journal),
                          compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=in_flight),
                          batch_size=config.batch_size,
                          batch_format="pyarrow", num_gpus=gpus or None, num_cpus=cpus, runtime_env=runtime_env,
                          **actors_retry)


__all__ = ["run_precompute", "PrecomputeSummary", "ManifestMismatch", "default_encoders", "inputs_to_do"]
