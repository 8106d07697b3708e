"""Training steps on CPU with 1 torch thread vs all cores, side by side in one run.

Why: Ray starts each worker with OMP_NUM_THREADS set to its CPU request, so a lone Ray Train worker on a
2-core node computed on one core; `pipelines.cluster.cpu_threads` gives every CPU worker its share of the
node's cores (training workers: after one core left to Ray, since inside Ray jobs on 2 cores one thread beat two
although the bare step is faster on two). This measures the bare step for the steps the demo runs, without Ray:

- `xut64` / `xut32`: a flow-matching step of the `tiny` XUT, batch 32 (the demo's), 12 context tokens of 384
  (all-MiniLM-L6-v2's width; random here: the text encoder is not part of the step), at 64 / 32 px;
- `vae32`: an MSE step of the demo's `tiny` VAE on 16 crops of 32 px (the EQ-VAE job's demo batch).

Each case runs `--steps` steps per thread count after 5 warm-up steps, for `--rounds` rounds that alternate
which thread count goes first (so slow drifts in the machine's speed hit both alike); rates are summed.

    .venv/bin/python benchmarks/bench_threads.py          # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def cases(batch: int) -> dict:
    from hdm_model import build_denoiser, build_optimizer, flow_matching_loss
    from hdm_model.eqvae import build_vae

    torch.manual_seed(0)
    xut = build_denoiser("tiny", ctx_dim=384, tread_rate=0.0)
    xut_opt = build_optimizer(xut, base_lr=0.3, weight_decay=0.02, betas=(0.9, 0.98))
    vae = build_vae("tiny")
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)

    def xut_step(res: int) -> None:
        z, ctx = torch.randn(batch, 4, res // 8, res // 8), torch.randn(batch, 12, 384)
        flow_matching_loss(xut, z, ctx).backward()
        xut_opt.step()
        xut_opt.zero_grad(set_to_none=True)

    def vae_step() -> None:
        x = torch.rand(16, 3, 32, 32) * 2 - 1
        (vae(x).sample - x).pow(2).mean().backward()
        vae_opt.step()
        vae_opt.zero_grad(set_to_none=True)

    return {"xut64": lambda: xut_step(64), "xut32": lambda: xut_step(32), "vae32": vae_step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="timed steps per case, thread count and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="XUT batch (the demo's)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    print(f"{cores} cores; 1 thread vs {cores}; {args.steps} steps x {args.rounds} rounds per case")
    for name, step in cases(args.batch_size).items():
        seconds = {1: 0.0, cores: 0.0}
        for r in range(args.rounds):
            for threads in (1, cores) if r % 2 == 0 else (cores, 1):
                torch.set_num_threads(threads)
                for _ in range(5):
                    step()
                t = time.perf_counter()
                for _ in range(args.steps):
                    step()
                seconds[threads] += time.perf_counter() - t
        n = args.steps * args.rounds
        print(f"  {name}: 1 thread {n / seconds[1]:6.2f} steps/s, {cores} threads {n / seconds[cores]:6.2f} steps/s"
              f"   ratio {seconds[1] / seconds[cores]:.2f}", flush=True)


if __name__ == "__main__":
    main()
