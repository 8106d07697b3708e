"""The training stage on CPU: the share of step time spent waiting for data, and samples/s with 2 Ray Train
workers vs 1, measured side by side in one run.

Setup (flags override): the `tiny` preset at 64 px (8x8 latents, some wide or tall, cropped per step), a
generated latent set of 32 rows (`tests/pipelines/latent_fixtures.make_latent_dataset`), the 2-layer Qwen3
text encoder of `tests/tiny_models` (8 tokens), batch 8 per worker, no accumulation. Each run is the real
job (`pipelines.train.stage.run_training_stage`: Ray Data, Ray Train, MLflow into a temporary sqlite file) on a local
Ray started here with `--cpus` CPUs (workers reserve (CPUs - 1) / workers each, as always).

What is measured: the worker loop's own meter, logged to MLflow every `--log-every` steps. Data wait is the
time the loop is blocked waiting for its next batch (the per-sample decode and crop run ahead in the worker's
prefetch thread; text encoding and the step itself are step time). The first logged interval (step 1: worker start-up, first read) is left out; the rest are summed.
Samples/s counts every worker's samples. Rounds alternate which worker count goes first, so slow drifts in
the machine's load hit both alike; the table shows every run and the medians over rounds.

    .venv/bin/python benchmarks/bench_train.py                     # ~4 min on 2 cores (1 min per run)
    .venv/bin/python benchmarks/bench_train.py --rows 13 --batch-size 2 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def steady_state(client, run_id: str) -> dict[str, float]:
    """samples/s and data-wait share over the logged intervals after step 1 (time-weighted)."""
    history = {name: {m.step: m.value for m in client.get_metric_history(run_id, name)}
               for name in ("steps_per_s", "samples_per_s", "data_wait")}
    logged = sorted(history["steps_per_s"])
    intervals = list(zip(logged, logged[1:]))  # (previous log step, this log step)
    seconds = {b: (b - a) / history["steps_per_s"][b] for a, b in intervals}
    total = sum(seconds.values())
    return {"samples_per_s": sum(history["samples_per_s"][b] * s for b, s in seconds.items()) / total,
            "data_wait": sum(history["data_wait"][b] * s for b, s in seconds.items()) / total,
            "seconds": total, "steps": logged[-1] - logged[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--rows", type=int, default=32, help="latent rows in the generated set")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    ap.add_argument("--rounds", type=int, default=2, help="runs per worker count, alternating")
    ap.add_argument("--batch-size", type=int, default=8, help="per worker")
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray started here")
    args = ap.parse_args()

    import ray
    from mlflow import MlflowClient

    from pipelines.train.config import TrainStageConfig
    from pipelines.train.stage import run_training_stage
    from tests.pipelines.latent_fixtures import make_latent_dataset
    from tests.tiny_models import make_tiny_text_encoder, make_tiny_vae

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    te, vae = make_tiny_text_encoder(tmp / "te"), make_tiny_vae(tmp / "vae")
    make_latent_dataset(str(tmp / "latents"), [args.res], args.rows, vae=str(vae))
    uri = f"sqlite:///{tmp}/mlflow.db"
    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    print(f"ray.init {time.perf_counter() - t0:.1f} s (excluded); {args.rows} rows at {args.res} px, batch "
          f"{args.batch_size}/worker, {args.steps} steps, log every {args.log_every}, {args.cpus} CPUs")
    client = MlflowClient(uri)
    results: dict[int, list[dict[str, float]]] = {w: [] for w in args.workers}
    try:
        for i in range(args.rounds):
            for workers in args.workers if i % 2 == 0 else args.workers[::-1]:
                config = TrainStageConfig(
                    res=args.res, latents=str(tmp / "latents"), storage=str(tmp / "runs"), name=f"r{i}-w{workers}",
                    model="tiny", text_encoder=str(te), init_from="none", steps=args.steps, warmup_steps=2,
                    batch_size=args.batch_size, grad_accum=1, ctx_length=8, checkpoint_every=10_000,
                    log_every=args.log_every, workers=workers, max_failures=0,
                    sample={"every": 10_000, "steps": 1, "seeds": [0], "prompts": ["a"]},
                    tracking={"uri": uri, "experiment": "bench"})
                start = time.perf_counter()
                summary = run_training_stage(config)
                stats = {**steady_state(client, summary.run_id), "wall": time.perf_counter() - start}
                results[workers].append(stats)
                print(f"  round {i} workers {workers}: {stats['samples_per_s']:7.1f} samples/s, data wait "
                      f"{stats['data_wait']:6.1%} over {stats['steps']} steps ({stats['seconds']:.1f} s; "
                      f"whole run {stats['wall']:.1f} s)", flush=True)
    finally:
        ray.shutdown()

    print(f"\n{'workers':>8} {'samples/s':>10} {'data wait':>10}   (medians over {args.rounds} rounds)")
    med = {w: {k: statistics.median(r[k] for r in rs) for k in ("samples_per_s", "data_wait")}
           for w, rs in results.items()}
    for w, m in med.items():
        print(f"{w:>8} {m['samples_per_s']:>10.1f} {m['data_wait']:>10.1%}")
    base = args.workers[0]
    for w in args.workers[1:]:
        print(f"samples/s ratio {w} vs {base} workers: {med[w]['samples_per_s'] / med[base]['samples_per_s']:.2f}x")


if __name__ == "__main__":
    main()
