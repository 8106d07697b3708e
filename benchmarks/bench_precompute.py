"""Latent precompute: the Ray Data job (`pipelines.data.precompute.run_precompute`) vs a plain single-process loop
doing the same work on the same inputs, in one run; plus a streaming check of the job's peak memory.

Inputs: N synthetic JPEGs (short side 300-900 px, long side up to 1200 px, aspect ratios 1:1 to 16:9 both
ways) in a temp folder; a randomly initialised AutoencoderKL saved to a temp dir, by default with the SDXL VAE
architecture (so the compute is the real one), `--vae-width small` or `tiny` for quick runs.

Work per image, in both: read the bytes (pyarrow filesystem), `decode_image` + sha256, `resize_for_resolution`
per resolution, `LatentVAE.encode` (mean and std) of the images of one batch grouped by size, exactly as
`EncodeStage` groups them, fp16 conversion, output rows, and the Parquet write (`LatentWriter`): writing is
INCLUDED in both, one file per batch (the job gets rows_per_file = batch_size).

Throughput method. Steady state: in the loop, all N images over the time from the start of the first VAE encode
call to the end of the last Parquet write (one process: nothing to fill or drain but the first batch's read and
decode, ~50 ms, left out); in the job, from `ray.timeline()`, the images encoded in the window in which every
encoder worked (from the start of its last encoder's first batch to the end of its first encoder's last batch;
a batch across an edge counts the fraction of it inside), over that window. Ray Data is told to start processing
only once all encoders are up (`DataContext.wait_for_min_actors_s`), so no encoder starts late. Also printed: the
job "with the drain", all N images from its first encoder task to its last Write (the last batches run while
other encoders have run out of work: a cost of ~one batch per job, large in these short rounds, small in a long
job), the rate from "VAE loaded" (the loop: after `LatentVAE.from_pretrained`; the job: its last encoder actor's
constructor), which adds the first batch's read and decode (in the job, in a freshly started worker), and the
whole `run_precompute` call.
`ray.init` (cluster start) is timed apart and excluded. The job runs once per `--encoders` value (default: 1,
one per core, the job's default on CPU; each with cores/encoders torch threads) on a local cluster started by this
script with `--cpus` CPUs. The N images are split over `--rounds` rounds (default 2); in each the loop and the
job(s) process the same images, taking turns to go first, so that slow drifts in the machine's load hit both
alike; rates are summed over rounds.

Ray starts its workers at nice 15; this script sets RAY_worker_niceness=0 (flag `--ray-niceness`) so that the
job runs at the loop's priority (on a machine shared with other busy processes, nice 15 starves the job and the
comparison would measure priorities). The CPU taken by other people's processes during each phase is printed:
the numbers are only trustworthy when it is near 0.

Memory mode (`--memory N1 N2`): runs the job alone (tiny VAE, batch 16, 300-500 px images by default) on N1
then N2 images, each on a fresh local cluster, sampling every 0.2 s the summed RSS (and every 1 s the PSS, which
counts shared object-store pages once) of this driver and every process of the cluster it started (its
descendants, from /proc). A streaming job's peak must not grow with N, nor from one quarter of a run to the next.

    .venv/bin/python benchmarks/bench_precompute.py                 # throughput, SDXL-size VAE (~4 min)
    .venv/bin/python benchmarks/bench_precompute.py --vae-width small --n 64 --res 256 512
    .venv/bin/python benchmarks/bench_precompute.py --memory 100 400
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipelines.cluster import cpu_threads  # noqa: E402
from proc_sampler import ProcSampler  # noqa: E402  (benchmarks/proc_sampler.py)

VAE_WIDTHS = {"sdxl": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
              "small": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, norm_num_groups=32),
              "tiny": dict(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=16)}
ASPECTS = (1.0, 1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)
MAX_PIXELS, MAX_ASPECT = 100_000_000, 3.0  # the job's defaults


def make_vae(directory: Path, width: str) -> Path:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.13025,
                  **VAE_WIDTHS[width]).save_pretrained(directory)
    return directory


def make_images(directory: Path, n: int, *, short=(300, 900), long_max=1200, seed=0) -> float:
    """n JPEGs of mixed sizes with smooth content plus texture (realistic JPEG sizes); returns mean MPx."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    mpx = 0.0
    for i in range(n):
        s = int(rng.integers(short[0], short[1] + 1))
        aspect = ASPECTS[i % len(ASPECTS)]
        w, h = (s, round(s / aspect)) if aspect < 1 else (round(s * aspect), s)
        scale = min(1.0, long_max / max(w, h))
        w, h = max(short[0], int(w * scale)), max(short[0], int(h * scale))
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([x / w, y / h, 0.5 + 0.5 * np.sin((x + y) / (20 + i % 7))], -1) * 200
        texture = np.asarray(Image.fromarray(rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), np.uint8))
                             .resize((w, h), Image.Resampling.BILINEAR), np.float32)
        arr = np.clip(base + 0.25 * texture, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(directory / f"img{i:05d}.jpg", quality=90)
        mpx += w * h / 1e6
    return mpx / max(n, 1)


Span = tuple[float, float, str]  # a task's (start, end) epoch seconds and the worker that ran it


def encode_spans(spans: dict[str, list[Span]]) -> list[Span]:
    """The encoder actors' batch calls (read and decode fused into them or not) among a job's task spans."""
    return [span for op, s in spans.items() if "EncodeStage" in op and op.endswith(".submit") for span in s]


def all_busy(tasks: list[Span], images: int) -> tuple[float, float]:
    """(images, seconds) of the window in which every encoder worked: from the last encoder's first task start
    to the first encoder's last task end. Each task (`encode_spans`) counts the overlapping fraction of its
    images (images / tasks each: the batches are equal)."""
    workers: dict[str, list[tuple[float, float]]] = {}
    for start, end, worker in tasks:
        workers.setdefault(worker, []).append((start, end))
    t0, t1 = max(min(s for s, _ in w) for w in workers.values()), min(max(e for _, e in w) for w in workers.values())
    overlap = sum(max(0.0, min(e, t1) - max(s, t0)) / (e - s) for s, e, _ in tasks)
    return overlap * images / len(tasks), t1 - t0


def job_timeline(events: list[dict]) -> dict[str, list[Span]]:
    """The spans of the tasks of the job's operators, from `ray.timeline()` (cat 'task::OP')."""
    spans: dict[str, list[Span]] = {}
    for e in events:
        cat = e.get("cat", "")
        if e.get("ph") == "X" and cat.startswith("task::") and ("Stage" in cat or cat == "task::Write"):
            spans.setdefault(cat[len("task::"):], []).append((e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6, e["tid"]))
    return spans


# ---------------------------------------------------------------------------------------------------
# The plain loop

def run_loop(input_dir: Path, output: Path, vae_dir: Path, resolutions: list[int], batch_size: int,
             store_std: bool = True) -> dict:
    import pyarrow as pa
    import torch

    from hdm_model import LatentVAE
    from pipelines.data.images import ImageError, TransformSpec, decode_image, resize_for_resolution
    from pipelines.data.latent_store import OUTPUT_SCHEMA, LatentWriter
    from pipelines.data.sources import list_units
    from pipelines.storage import read_bytes, resolve

    fs, root = resolve(str(input_dir))
    _, units = list_units(fs, root)
    out_fs, out_root = resolve(str(output))
    writer, spec = LatentWriter(out_fs, out_root), TransformSpec(max_aspect=MAX_ASPECT)
    t = time.perf_counter()
    vae = LatentVAE.from_pretrained(str(vae_dir), chunk_size=batch_size)  # torch threads: all cores, as the actor
    load_s = time.perf_counter() - t

    split, clock = Counter(), time.perf_counter

    def timed(stage, fn, *args):
        t0 = clock()
        result = fn(*args)
        split[stage] += clock() - t0
        return result

    start, first_encode = clock(), None
    for b in range(0, len(units), batch_size):
        jobs = []  # (unit, sha256, image size, res, pixels)
        for unit in units[b:b + batch_size]:
            data = timed("read", read_bytes, fs, unit.path)
            try:
                img, sha = timed("decode+sha256", lambda: (decode_image(data, max_pixels=MAX_PIXELS),
                                                    hashlib.sha256(data).hexdigest()))
            except ImageError:
                continue
            for r in resolutions:
                try:
                    jobs.append((unit, sha, img.size, r, timed("resize", resize_for_resolution, img, r, spec)))
                except ImageError:
                    pass
        by_size: dict[tuple[int, int], list] = {}
        for job in jobs:
            by_size.setdefault(job[4].shape[:2], []).append(job)
        rows = []
        for (h, w), group in by_size.items():
            def encode():
                nonlocal first_encode
                first_encode = first_encode or clock()
                images = torch.from_numpy(np.stack([j[4] for j in group])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
                return vae.encode(images)
            mean, std = timed("encode", encode)
            t0 = clock()
            mean, std = mean.half().numpy(), std.half().numpy()
            for (unit, sha, (width, height), r, _), m, s in zip(group, mean, std):
                rows.append({"kind": "latent", "res": r, "key": unit.key, "sha256": sha, "source": unit.path,
                             "caption": "", "caption_source": "none", "width": width, "height": height,
                             "resized_width": w, "resized_height": h, "aspect": w / h, "latent": m.tobytes(),
                             "latent_shape": list(m.shape), "latent_std": s.tobytes() if store_std else None})
            split["fp16 + rows"] += clock() - t0
        if rows:
            timed("parquet write", writer.write, pa.Table.from_pylist(rows, OUTPUT_SCHEMA))
    end = clock()
    return {"load_s": load_s, "ready_s": end - start, "steady_s": end - first_encode, "split": split,
            "n": len(units)}


# ---------------------------------------------------------------------------------------------------
# The Ray job

def start_ray(cpus: int) -> float:
    import ray

    t = time.perf_counter()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return time.perf_counter() - t


def run_job(input_dir: Path, output: Path, vae_dir: Path, resolutions: list[int], batch_size: int,
            encoders: int, threads: int | None) -> dict:
    """run_precompute, timed; steady state = from the first encoder task's start to the end of the last write."""
    import ray

    from pipelines.data.config import PrecomputeConfig
    from pipelines.data.precompute import run_precompute

    config = PrecomputeConfig(input=str(input_dir), output=str(output), resolutions=resolutions, vae=str(vae_dir),
                              batch_size=batch_size, rows_per_file=batch_size, encoders=encoders,
                              threads_per_encoder=threads)
    # start processing once every encoder has loaded the VAE (else the first one ready takes the first batches
    # and a short run measures one encoder); the read/decode of the first batch then counts, as in the loop
    ray.data.DataContext.get_current().wait_for_min_actors_s = 3600
    wall0, t = time.time(), time.perf_counter()
    summary = run_precompute(config)
    total_s = time.perf_counter() - t
    spans = {op: [span for span in sp if span[0] >= wall0] for op, sp in job_timeline(ray.timeline()).items()}
    inits = [end for op, s in spans.items() if op.endswith("(EncodeStage)).__init__") for _, end, _ in s]
    ready, last_write = max(inits), max(end for _, end, _ in spans["Write"])
    first_encode = min(b for b, _, _ in encode_spans(spans))
    busy_images, busy_s = all_busy(encode_spans(spans), summary.rows.get(resolutions[0], 0))
    return {"total_s": total_s, "startup_s": ready - wall0, "ready_s": last_write - ready,
            "steady_s": last_write - first_encode, "busy_images": busy_images, "busy_s": busy_s,
            "finish_s": wall0 + total_s - last_write, "spans": spans, "summary": summary}


# ---------------------------------------------------------------------------------------------------

def throughput(args, tmp: Path) -> None:
    import ray
    import torch

    t = time.perf_counter()
    vae_dir = make_vae(tmp / "vae", args.vae_width)
    per_round = args.n // args.rounds
    mpx = [make_images(tmp / f"images-{r}", per_round, seed=args.seed + r) for r in range(args.rounds)]
    n = per_round * args.rounds
    print(f"setup: N = {n} JPEGs ({args.rounds} rounds x {per_round}, mean {sum(mpx) / len(mpx):.2f} MPx) and a "
          f"random {args.vae_width} VAE {VAE_WIDTHS[args.vae_width]['block_out_channels']} in "
          f"{time.perf_counter() - t:.1f} s; res {args.res}, batch {args.batch_size}, {os.cpu_count()} cores; loop: "
          f"torch threads {torch.get_num_threads()}; job: Ray workers at nice {os.environ['RAY_worker_niceness']} "
          f"(the loop at {os.nice(0)})", flush=True)
    loops, jobs, inits = [], {e: [] for e in args.encoders}, []
    for r in range(args.rounds):  # the loop and the job take turns going first, on the same images per round
        images = tmp / f"images-{r}"
        for phase in ("loop", "ray") if (r % 2 == 0) == (args.order == "loop-first") else ("ray", "loop"):
            if phase == "loop":
                sampler = ProcSampler(0.5)
                sampler.start()
                loops.append(run_loop(images, tmp / f"out-loop-{r}", vae_dir, args.res, args.batch_size))
                loops[-1]["cpu"] = sampler.stop()
                continue
            inits.append(start_ray(args.cpus))
            try:
                for encoders in args.encoders:
                    sampler = ProcSampler(0.5)
                    sampler.start()
                    jobs[encoders].append(run_job(images, tmp / f"out-ray-{encoders}-{r}", vae_dir, args.res,
                                                  args.batch_size, encoders, args.threads))
                    jobs[encoders][-1]["cpu"] = sampler.stop()
            finally:
                ray.shutdown()
        print(f"round {r + 1}/{args.rounds}: loop {per_round / loops[-1]['steady_s']:.3f} images/s; " + ", ".join(
            f"job {e} enc {j[-1]['busy_images'] / j[-1]['busy_s']:.3f} (every encoder busy), "
            f"{per_round / j[-1]['steady_s']:.3f} (with the drain)" for e, j in jobs.items()), flush=True)

    print(f"\n=== precompute throughput: N = {n} images, res {args.res}, batch {args.batch_size}, "
          f"{args.vae_width} VAE, {args.cpus} CPUs; Parquet writing INCLUDED in both ===")
    loop_rate = n / sum(x["steady_s"] for x in loops)
    print("steady state: the job's images / time in the window in which every encoder worked (from its last encoder's "
          "first batch to its first encoder's last; batches across the edges count pro rata); the loop (one process, "
          "no drain) over the next window; summed over rounds")
    print(f"  plain loop, torch threads {torch.get_num_threads()}  : {loop_rate:6.3f} images/s")
    for encoders, runs in jobs.items():
        rate = sum(j["busy_images"] for j in runs) / sum(j["busy_s"] for j in runs)
        print(f"  ray job, {encoders} encoder(s) x {cpu_threads(encoders, args.threads)} thread(s): {rate:6.3f} "
              f"images/s ({sum(j['busy_s'] for j in runs):.1f} s)   ratio ray/loop = {rate / loop_rate:.3f}  "
              "(per round: "
              + ", ".join(f"{j['busy_images'] / j['busy_s'] * x['steady_s'] / per_round:.2f}"
                          for x, j in zip(loops, runs)) + ")")
    for window, title in (("steady_s", "with the drain: images / time from the first VAE encode call to the end of "
                           "the last Parquet write (pipeline fill excluded; the job's last batches run on fewer "
                           "encoders)"),
                          ("ready_s", "from 'VAE loaded': images / time from the (last) VAE load to the end of the "
                           "last Parquet write (adds the first batch's read and decode)")):
        loop_s = sum(x[window] for x in loops)
        loop_rate = n / loop_s
        print(f"{title}, summed over rounds; ray.init excluded")
        print(f"  plain loop, torch threads {torch.get_num_threads()}  : {loop_rate:6.3f} images/s  ({loop_s:.1f} s)")
        for encoders, runs in jobs.items():
            job_s = sum(j[window] for j in runs)
            threads = cpu_threads(encoders, args.threads)
            print(f"  ray job, {encoders} encoder(s) x {threads} thread(s): {n / job_s:6.3f} images/s  ({job_s:.1f} s)"
                  f"   ratio ray/loop = {(n / job_s) / loop_rate:.3f}  (per round: " + ", ".join(
                      f"{x[window] / j[window]:.2f}" for x, j in zip(loops, runs)) + ")")
    for encoders, runs in jobs.items():
        busy = sum(e - b for j in runs for b, e, _ in encode_spans(j["spans"])) / encoders
        steady = sum(j["steady_s"] for j in runs)
        print(f"  ray job, {encoders} enc: encoder tasks fill {busy / steady:.1%} of the window with the drain per "
              f"encoder (the rest: an encoder waiting for a batch, or the last write)")
    print(f"  start-up (excluded): ray.init {' / '.join(f'{s:.1f}' for s in inits)} s; loop model load "
          + " / ".join(f"{x['load_s']:.2f}" for x in loops) + " s; job start -> encoder ready (planning, worker "
          "start, imports, VAE load): " + "; ".join(f"{e} enc " + " / ".join(f"{j['startup_s']:.1f}" for j in runs)
                                                   + " s" for e, runs in jobs.items()))
    print("  whole run_precompute incl. start-up: " + "; ".join(
        f"{e} enc {n / sum(j['total_s'] for j in runs):.3f} images/s" for e, runs in jobs.items()))
    split = Counter()
    for x in loops:
        split.update(x["split"])
    total = sum(split.values())
    print(f"  plain-loop stage split ({total:.1f} s timed over {n} images):")
    for stage, sec in split.items():
        print(f"    {stage:14s} {100 * sec / total:5.1f} %  {1000 * sec / n:8.1f} ms/image")
    for encoders, runs in jobs.items():
        ops = Counter()
        for j in runs:
            ops.update({op: sum(e - b for b, e, _ in sp) for op, sp in j["spans"].items()})
        print(f"  ray job, {encoders} enc: seconds inside tasks (ray.timeline(), incl. argument deserialisation): "
              + "; ".join(f"{op.replace('MapWorker(MapBatches(', '').replace('))', '')} {sec:.1f}"
                          for op, sec in ops.items()))
    print("  CPU (average cores per phase; 'others' = other people's processes on this shared machine):")
    for name, runs in [("loop", loops)] + [(f"ray {e} enc", runs) for e, runs in jobs.items()]:
        print(f"    {name:10s} " + "; ".join(f"ours {x['cpu']['ours']:.2f} others {x['cpu']['others']:.2f}"
                                           for x in runs) + "; top (last round): " + "; ".join(
            f"{pname.split(' ')[0][:40]} {cpu:.0f} s" for cpu, _, pname in runs[-1]["cpu"]["top"][:4]))
    print("  job rows: " + "; ".join(f"{e} enc: " + ", ".join(f"{j['summary'].rows}" for j in runs)
                                     for e, runs in jobs.items()) + "; errors: " + str(sum(
        sum(j["summary"].errors.values()) for runs in jobs.values() for j in runs)))


def memory(args, tmp: Path) -> None:
    import ray

    from pipelines.data.config import PrecomputeConfig
    from pipelines.data.precompute import run_precompute

    vae_dir = make_vae(tmp / "vae", args.vae_width)
    print(f"memory: {args.vae_width} VAE, res {args.res}, batch {args.batch_size}, images 300-500 px; RSS (and PSS) "
          f"summed over this driver + every process of its local Ray cluster, sampled every 0.2 s", flush=True)
    peaks = {}
    for n in args.memory:
        make_images(tmp / f"images-{n}", n, short=(300, 400), long_max=500, seed=args.seed)
        start_ray(args.cpus)
        sampler = ProcSampler(0.2, pss=True)
        sampler.start()
        t = time.perf_counter()
        try:
            summary = run_precompute(PrecomputeConfig(
                input=str(tmp / f"images-{n}"), output=str(tmp / f"out-{n}"), resolutions=args.res, vae=str(vae_dir),
                batch_size=args.batch_size, encoders=args.encoders[0], threads_per_encoder=args.threads))
        finally:
            sampler.stop()
            ray.shutdown()
        peaks[n] = sampler.peak_rss, sampler.peak_private
        print(f"  N = {n:5d}: {time.perf_counter() - t:.1f} s, rows {summary.rows}; peak RSS sum "
              f"{sampler.peak_rss / 2**20:.0f} MiB, peak PSS sum {sampler.peak_pss / 2**20:.0f} MiB, peak RSS without "
              f"shared memory {sampler.peak_private / 2**20:.0f} MiB ({sampler.samples} samples, up to "
              f"{sampler.max_procs} processes)\n      by quarter of the run, peak RSS sum: {sampler.quarter_peaks(1)}"
              f" MiB, without shared memory: {sampler.quarter_peaks(2)} MiB; largest processes at the RSS peak:",
              flush=True)
        for rss, pid, name in sampler.at_peak:
            print(f"      {rss / 2**20:6.0f} MiB  pid {pid}  {name}")
    (n1, (p1, q1)), (n2, (p2, q2)) = list(peaks.items())[:2]
    print(f"=== peak RSS sum: N={n1}: {p1 / 2**20:.0f} MiB, N={n2}: {p2 / 2**20:.0f} MiB (x{p2 / p1:.2f} for "
          f"x{n2 / n1:.1f} the images); without shared memory: {q1 / 2**20:.0f} -> {q2 / 2**20:.0f} MiB "
          f"(x{q2 / q1:.2f}) ===")


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: ray.shutdown(), temp dirs
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16,
                    help="images in all (default 16: ~4 min with the SDXL-size VAE on 2 idle cores)")
    ap.add_argument("--res", type=int, nargs="+", default=[256])
    ap.add_argument("--batch-size", type=int, help="VAE batch; throughput: default 4, also the job's rows_per_file "
                    "(one file per batch); memory: default 16 (the job's defaults)")
    ap.add_argument("--vae-width", choices=list(VAE_WIDTHS), default=None, help="default: sdxl (memory: tiny)")
    ap.add_argument("--encoders", type=int, nargs="+", default=[1, os.cpu_count()],
                    help="job: VAE actors, one job run per value (default: 1, and one per core: the job's default)")
    ap.add_argument("--threads", type=int, default=None, help="job: torch threads per encoder (default: its own)")
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="num_cpus of the local Ray cluster")
    ap.add_argument("--ray-niceness", type=int, default=0,
                    help="nice value of Ray's workers (Ray's own default is 15, which on a machine shared with other "
                    "busy processes starves the job; 0 = the loop's priority)")
    ap.add_argument("--rounds", type=int, default=2, help="the N images are split over this many rounds; in each, the "
                    "loop and the job run on the same images, taking turns to go first (default 2)")
    ap.add_argument("--order", choices=["loop-first", "ray-first"], default="loop-first", help="in the first round")
    ap.add_argument("--memory", type=int, nargs=2, metavar=("N1", "N2"), help="peak-memory check instead")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.vae_width = args.vae_width or ("tiny" if args.memory else "sdxl")
    args.batch_size = args.batch_size or (16 if args.memory else 4)
    os.environ["RAY_worker_niceness"] = str(args.ray_niceness)  # read by the raylet that ray.init starts
    with tempfile.TemporaryDirectory(prefix="bench-precompute-") as tmp:
        (memory if args.memory else throughput)(args, Path(tmp))


if __name__ == "__main__":
    main()
