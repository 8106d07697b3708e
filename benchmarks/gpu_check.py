"""The prepared one-GPU check of issue 16: one call measures every case below, under 8 minutes on one GPU.

The cases run in the order a b c d e g f (or as --cases says). Each appends ONE JSON line to
OUT/results.jsonl as soon as it ends (flushed and fsynced: a timeout keeps what finished) and prints a line.
A case that fails (out of memory included) records its error and the run goes on; one that would not fit the
time left (`--budget-s`) is recorded as skipped; a last line sums up. The denoiser is
xut-base at 256 px (256 image + 256 text tokens), batch 128, the text encoder Qwen3-0.6B's shape (random
init from its config, nothing downloaded), and every step is the training stage's own
(pipelines/train/step.py `TrainStep`, built by `build_model` from a `TrainStageConfig`).

    a  probe: versions, device, the residual stream's dtype under the step's autocast, the SDPA kernel the
       denoiser's attention actually runs, measured copy bandwidth and bf16 GEMM rate
    b  the text encoder alone: its attention kernels compared (benchmarks/text_kernels.py), captions/s
    c  the denoiser eager on precomputed text states: dense vs TREAD 0.5 x checkpointing none/outer/mlp/full
    d  a profiler split of one full step's kernel time into GEMM / attention / other: the H100 projection
    e  the full step with the text encoder online, as the worker runs it (tokens prepared and pinned ahead)
    f  (e) compiled (regional torch.compile of the blocks and of the text encoder); compile time apart
    g  the precompute job's GPU encoder (pipelines/data/encode.py) with an SDXL-size VAE in fp16 at 256 and
       512 px, against a plain loop over the same images already on the GPU

MFU: the denoiser's training FLOPs are 3x its forward (`hdm_model.flops`; recomputation by checkpointing not
counted, as usual), plus the text encoder's forward where it runs, over the GPU's dense bf16 peak (a table by
device name, or --peak-tflops). The H100 SXM projection scales the GEMM and attention time of the (d) split
by peak FLOPs (989 TFLOP/s) and the rest by nominal memory bandwidth (3.35 TB/s), host gaps unchanged; before
(d) has run, and for the VAE, by peak FLOPs alone. Goal: 300 samples/s per H100 (stretch 400) for (f);
HDM measured 60.9 per RTX 5090.

    bash benchmarks/gpu_check.sh                                  # on one GPU; results in $OUT or runs/gpu_check/
    .venv/bin/python benchmarks/gpu_check.py --smoke --out /tmp/g  # every case at tiny sizes on CPU (CI)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.gpu_parts import (  # noqa: E402
    BANDWIDTH_TB_S, FULL, H100_SXM, PEAK_BF16_TFLOPS, SEED, SMOKE, Bench, build_step, fmt_gib, fmt_pct, full_step,
    kernel_category, measure_copy, measure_gemm, memory_gib, probe_step, profiled_times, profiling, run_steps,
    smoke_backend, stage_config, step_flops, synthetic_batches, table_value, text_encoder_flops, timed_calls)

HDM_REFERENCE, GOAL, STRETCH = 60.9, 300.0, 400.0  # samples/s per GPU at 256 px (RTX 5090; H100 goal, stretch)
ESTIMATE_S = dict(a=25, b=40, c=90, d=30, e=30, f=150, g=45)  # on one H100-class GPU: a case starts if it fits


# ---------------------------------------------------------------------------------------------------
# The cases: each returns its record (merged into the JSON line) with a "summary" for the printed line

def case_probe(bench: Bench) -> dict:
    """Versions, device, residual dtype and the SDPA backend in the step, copy bandwidth, GEMM rate."""
    import transformers

    record = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
              "cudnn": torch.backends.cudnn.version() if bench.cuda else None}
    if bench.cuda:
        props = torch.cuda.get_device_properties(bench.device)
        record.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                      memory_gib=props.total_memory / 2**30)
    record.update(probe_step(bench))
    record.update(copy_tb_s=measure_copy(bench), gemm_tflops=measure_gemm(bench))
    bench.measured.update(copy_tb_s=record["copy_tb_s"], gemm_tflops=record["gemm_tflops"])
    record["summary"] = (f"{record.get('device', 'CPU')}: torch {record['torch']}, "
                         f"residual {record['residual_dtype']}, "
                         f"SDPA {'/'.join(record['sdpa_backends']) or '?'}, copy {record['copy_tb_s']:.2f} TB/s, "
                         f"GEMM {record['gemm_tflops']:.3g} TFLOP/s")
    return record


def case_text_encoder(bench: Bench) -> dict:
    """Qwen3-0.6B's shape alone, batch 128 x 256 tokens of varied caption lengths: its attention kernels
    (benchmarks/text_kernels.py), captions/s and MFU of the fastest exact one."""
    from transformers import Qwen3Config

    from benchmarks.text_kernels import compare_kernels

    config = Qwen3Config(**bench.sizes.text, max_position_embeddings=4096, pad_token_id=0)
    batch, length = bench.sizes.batch, bench.sizes.ctx_length
    torch.manual_seed(SEED)
    rows = compare_kernels(config, device=bench.device, dtype=torch.bfloat16 if bench.cuda else torch.float32,
                           batch=batch, length=length)
    flops = text_encoder_flops(config, length)
    for row in rows:
        ms = next((v for k, v in row.items() if "ms" in k and isinstance(v, (int, float))), None)
        if ms:
            row.update(captions_per_s=batch / ms * 1e3, mfu=bench.mfu(flops, batch / ms * 1e3))
    timed = [r for r in rows if r.get("captions_per_s")]
    best = max(timed, key=lambda r: r["captions_per_s"], default={})
    return {"batch": batch, "length": length, "flops_per_caption": flops, "kernels": rows,
            "peak_memory_gib": memory_gib(bench),
            "summary": "; ".join(f"{r.get('kernel', '?')}: " + (f"{r['captions_per_s']:.0f} captions/s"
                                  if r.get("captions_per_s") else str(r.get("error"))) for r in rows)
            + (f" (best MFU {best['mfu']:.1%})" if best.get("mfu") else "")}


def case_denoiser_eager(bench: Bench) -> dict:
    """xut-base alone on precomputed text states: dense and TREAD 0.5, each checkpointing policy."""
    variants = []
    for tread in (0.0, 0.5):
        for policy in ("none", "outer", "mlp", "full"):
            variant = {"tread": tread, "checkpointing": policy}
            if bench.left() < (0 if bench.smoke else 10):
                variants.append({**variant, "status": "skipped", "reason": "budget"})
                continue
            variants.append({**variant, **guarded(lambda: denoiser_variant(bench, tread=tread, policy=policy), bench)})
    ok = [v for v in variants if v["status"] == "ok"]
    return {"variants": variants, "summary": ", ".join(
        f"{'TREAD' if v['tread'] else 'dense'}/{v['checkpointing']}: " +
        (f"{v['samples_per_s']:.0f}/s {fmt_gib(v['peak_memory_gib'])}" if v["status"] == "ok" else v["status"])
        for v in variants) + (f" (best {max(v['samples_per_s'] for v in ok):.0f} samples/s)" if ok else "")}


def denoiser_variant(bench: Bench, *, tread: float, policy: str) -> dict:
    cfg = stage_config(bench.sizes, tread_rate=tread, checkpointing=policy)
    torch.manual_seed(SEED)
    dim = bench.sizes.text["hidden_size"]
    states = torch.randn(cfg.batch_size, cfg.ctx_length, dim, device=bench.device,
                         dtype=torch.bfloat16 if bench.cuda else torch.float32)
    step = build_step(bench, cfg, ctx_dim=dim, encode_text=lambda batch: states)
    batches = synthetic_batches(bench.sizes.warmup + bench.sizes.steps, batch_size=cfg.batch_size,
                                channels=step.net.config.in_channels, side=cfg.res // 8, pin=bench.cuda)
    result = run_steps(bench, step, batches, warmup=bench.sizes.warmup)
    flops = step_flops(step, cfg, tread_rate=tread)
    return {"status": "ok", **result, "mfu": bench.mfu(flops, result["samples_per_s"]),
            **bench.project(result["samples_per_s"])}


def case_profile_split(bench: Bench) -> dict:
    """One full step (as (e)) under the profiler: kernel time by GEMM / attention / other, the gap to the
    step's unprofiled wall time, and from them the factor that projects this GPU's step time to an H100 SXM."""
    step, _, batches, _ = full_step(bench, compile_mode="off")
    wall_ms = run_steps(bench, step, batches, warmup=bench.sizes.warmup)["step_ms"]
    with profiling(bench) as prof:  # one more step, the last batch again
        step.micro_step(batches[-1])
        step.optimizer_step()
    split = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for name, ms in profiled_times(prof, bench).items():
        split[kernel_category(name)] += ms
    busy = sum(split.values())
    record = {"wall_ms": wall_ms, "kernel_ms": split, "busy_ms": busy, "gap_ms": max(0.0, wall_ms - busy),
              "source": "CUDA kernels" if bench.cuda else "CPU op self time", "factor": None,
              "bandwidth_tb_s_nominal": bench.bandwidth / 1e12 if bench.bandwidth else None,
              "copy_tb_s_measured": bench.measured.get("copy_tb_s")}
    if bench.peak and bench.bandwidth:
        compute = (split["gemm"] + split["attention"]) * bench.peak / (H100_SXM["tflops"] * 1e12)
        memory = split["other"] * bench.bandwidth / (H100_SXM["tb_s"] * 1e12)
        bench.factor = record["factor"] = (compute + memory + record["gap_ms"]) / wall_ms
    shares = ", ".join(f"{k} {v / max(busy, 1e-9):.0%}" for k, v in split.items())
    factor = f"x{record['factor']:.2f} time on H100 SXM" if record["factor"] else "no projection (peak unknown)"
    return {**record, "summary": f"step {wall_ms:.0f} ms: kernels {busy:.0f} ms ({shares}), "
                                 f"gap {record['gap_ms']:.0f} ms; {factor}"}


def case_full_step(bench: Bench, *, compile_mode: str = "off") -> dict:
    """The training step with the text encoder online, as the worker runs it."""
    step, text_encoder, batches, cfg = full_step(bench, compile_mode=compile_mode)
    # compiled, one more warm-up step: the text encoder recompiles (dynamic) at its second batch size
    warmup = bench.sizes.warmup + (1 if compile_mode != "off" else 0)
    batches = batches + batches[:warmup - bench.sizes.warmup]
    result = run_steps(bench, step, batches, warmup=warmup)
    flops = step_flops(step, cfg, tread_rate=cfg.tread_rate, text_config=text_encoder.model.config)
    record = {"checkpointing": cfg.checkpointing, "compile": compile_mode, "text_attn": cfg.text_attn, **result,
              "mfu": bench.mfu(flops, result["samples_per_s"]),
              "mfu_denoiser": bench.mfu(step_flops(step, cfg, tread_rate=cfg.tread_rate), result["samples_per_s"]),
              **bench.project(result["samples_per_s"])}
    h100 = record["h100_samples_per_s"]
    record["summary"] = (f"{cfg.checkpointing} checkpointing, compile {compile_mode}: {result['samples_per_s']:.1f} "
                         f"samples/s ({result['step_ms']:.0f} ms/step, warm-up {result['warmup_s']:.1f} s), MFU "
                         f"{fmt_pct(record['mfu'])}, {fmt_gib(result['peak_memory_gib'])}; H100 SXM "
                         + (f"{h100:.0f} samples/s (goal {GOAL:.0f}, stretch {STRETCH:.0f}; HDM {HDM_REFERENCE} per "
                            f"RTX 5090)" if h100 else "unknown"))
    return record


def case_compiled(bench: Bench) -> dict:
    """(e) with the denoiser's blocks and the text encoder compiled: compile time is the warm-up's."""
    with smoke_backend(bench):
        return case_full_step(bench, compile_mode="blocks")


def case_vae_encode(bench: Bench) -> dict:
    """The precompute job's encoder (BatchEncoder, what EncodeStage runs) with an SDXL-size VAE saved and
    loaded as the job loads it (fp16 on GPU), against a plain loop over the same images already on the GPU."""
    from diffusers import AutoencoderKL

    from pipelines.data.config import PrecomputeConfig
    from pipelines.data.encode import BatchEncoder

    batch_size = PrecomputeConfig.model_fields["batch_size"].default
    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as directory:
        AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      latent_channels=4, **bench.sizes.vae).save_pretrained(directory)
        encoder = BatchEncoder(directory, device=bench.device.type, batch_size=batch_size, store_std=True)
    rows = [vae_resolution(bench, encoder, res=res, batch_size=batch_size) for res in bench.sizes.vae_res]
    return {"batch_size": batch_size, "dtype": str(encoder.vae.vae.dtype), "resolutions": rows,
            "summary": "; ".join(f"{r['res']} px: job {r['job_images_per_s']:.0f} images/s, plain loop "
                                 f"{r['plain_images_per_s']:.0f} ({r['job_over_plain']:.0%})" for r in rows)}


def vae_resolution(bench: Bench, encoder, *, res: int, batch_size: int) -> dict:
    import pyarrow as pa
    from torch.utils.flop_counter import FlopCounterMode

    n = bench.sizes.vae_images
    pixels = torch.randint(0, 256, (n, res, res, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(SEED))
    table = pa.Table.from_pylist([
        {"kind": "item", "key": f"k{i}", "source": "synthetic", "caption": "", "caption_source": "input",
         "sha256": "", "width": res, "height": res, "res": [res], "pixels": [p.numpy().tobytes()], "pix_h": [res],
         "pix_w": [res], "err_res": None} for i, p in enumerate(pixels)])
    vae = encoder.vae.vae
    images = (pixels.to(bench.device).permute(0, 3, 1, 2).to(vae.dtype) / 127.5 - 1.0)

    def plain():
        with torch.no_grad():
            for chunk in images.split(batch_size):
                vae.encode(chunk).latent_dist.mean

    encoder(table.slice(0, batch_size))  # warm-up: kernel selection, allocator
    plain_s = timed_calls(bench, plain, warmup=1, reps=1)
    bench.sync()
    start = time.perf_counter()
    out = encoder(table)
    job_s = time.perf_counter() - start
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.encode(images[:1])
    rate = n / job_s
    return {"res": res, "images": n, "rows": out.num_rows, "job_images_per_s": rate, "plain_images_per_s": n / plain_s,
            "job_over_plain": rate * plain_s / n,
            "flops_per_image": counter.get_total_flops(), "mfu": bench.mfu(counter.get_total_flops(), rate),
            "peak_memory_gib": memory_gib(bench), **bench.project(rate, compute_bound=True)}


CASES: dict[str, tuple[str, Callable[[Bench], dict]]] = {
    "a": ("probe", case_probe), "b": ("text encoder", case_text_encoder), "c": ("denoiser eager", case_denoiser_eager),
    "d": ("profile split", case_profile_split), "e": ("full step", case_full_step), "f": ("compiled", case_compiled),
    "g": ("precompute encoder", case_vae_encode)}


# ---------------------------------------------------------------------------------------------------
# The runner

def guarded(fn: Callable[[], dict], bench: Bench) -> dict:
    """fn()'s record, or its error (out of memory apart) with the memory it held given back."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError as error:
        record = {"status": "oom", "error": str(error).splitlines()[0]}
    except Exception as error:  # recorded: the run goes on with the next case
        record = {"status": "error", "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc(limit=-6)}
    finally:
        gc.collect()
        if bench.cuda:
            torch.cuda.empty_cache()
    return record


def append_line(path: Path, record: dict) -> None:
    """One JSON line, on disk before the next case starts (a timeout or crash keeps it)."""
    with path.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_case(bench: Bench, key: str) -> dict:
    name, fn = CASES[key]
    need = 0 if bench.smoke else ESTIMATE_S[key]
    if bench.left() <= need:
        return {"case": key, "name": name, "status": "skipped",
                "reason": f"{max(bench.left(), 0):.0f} s of the budget left, the case needs ~{need} s"}
    if bench.cuda:
        torch.cuda.reset_peak_memory_stats(bench.device)
    start = time.perf_counter()
    record = guarded(lambda: {"status": "ok", **fn(bench)}, bench)
    if key == "f":
        torch._dynamo.reset()  # compiled graphs hold memory and guards the other cases do not need
    return {"case": key, "name": name, **record, "seconds": time.perf_counter() - start}


def summary_record(bench: Bench, records: list[dict]) -> dict:
    """Every measured samples/s projected with the final factor, and the target line (f, else e)."""
    projected = {}
    for r in records:
        if r.get("status") == "ok" and r["case"] in "ef":
            projected[r["case"]] = bench.project(r["samples_per_s"])["h100_samples_per_s"]
        for v in r.get("variants", []):
            if v.get("status") == "ok":
                projected[f"c:{'tread' if v['tread'] else 'dense'}/{v['checkpointing']}"] = \
                    bench.project(v["samples_per_s"])["h100_samples_per_s"]
    target = projected.get("f") or projected.get("e")
    line = (f"H100 SXM projection {target:.0f} samples/s per GPU vs goal {GOAL:.0f} / stretch {STRETCH:.0f} "
            f"(HDM {HDM_REFERENCE} per RTX 5090)" if target else "no projection for (e)/(f)")
    return {"case": "summary", "factor": bench.factor, "projected_h100": projected, "target_h100": target,
            "meets_goal": target >= GOAL if target else None, "summary": line, **bench.measured}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="abcdegf", help="which cases, in the order given (default: all, the "
                    "compiled case last: its compile time is the least predictable)")
    ap.add_argument("--out", help="output folder (default: $OUT, else runs/gpu_check/<date>)")
    ap.add_argument("--budget-s", type=float, default=420, help="a case that would end past this is skipped")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU, overriding the table")
    ap.add_argument("--bandwidth-tbs", type=float, help="nominal memory bandwidth, overriding the table")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 1 step, on CPU (CI)")
    args = ap.parse_args(argv)
    args.cases = [c for c in args.cases.replace(",", "") if c.strip()]
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        ap.error(f"unknown cases {unknown}: choose from {''.join(CASES)}")
    args.out = Path(args.out or os.environ.get("OUT") or f"runs/gpu_check/{datetime.now():%Y%m%d-%H%M%S}")
    return args


def make_bench(args: argparse.Namespace) -> Bench:
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = args.peak_tflops or table_value(PEAK_BF16_TFLOPS, name)
    bandwidth = args.bandwidth_tbs or table_value(BANDWIDTH_TB_S, name)
    return Bench(device=device, sizes=SMOKE if args.smoke else FULL, smoke=args.smoke,
                 peak=peak * 1e12 if peak else None, bandwidth=bandwidth * 1e12 if bandwidth else None,
                 deadline=time.perf_counter() + args.budget_s,
                 measured={"peak_tflops_table": peak, "bandwidth_tb_s_table": bandwidth})


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    bench = make_bench(args)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    print(f"gpu_check: cases {''.join(args.cases)} on {args.device}{' (smoke)' if args.smoke else ''}, budget "
          f"{args.budget_s:.0f} s -> {results}", flush=True)
    records = []
    for key in args.cases:
        record = run_case(bench, key)
        records.append(record)
        append_line(results, record)
        detail = record.get("summary") or record.get("error") or record.get("reason", "")
        print(f"[{key}] {record['name']}: {record['status']} ({record.get('seconds', 0):.1f} s) {detail}", flush=True)
    final = summary_record(bench, records)
    append_line(results, final)
    print(f"[summary] {final['summary']}", flush=True)
    return records + [final]


if __name__ == "__main__":
    main()
