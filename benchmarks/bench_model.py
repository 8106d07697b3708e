"""TREAD vs dense training-step time of the XUT denoiser, measured alternately in one run.

Config (stated here, overridable by flags): the released topology (depth 4, 1 encoder + 3 decoder blocks
per level, 1 pre + 3 post blocks) at width 256 (4 heads x 64, SwiGLU 768), 256 px (32x32 latent -> 256
image tokens) with 256 text tokens as in the release's 256 px stage, batch 2, fp32 on CPU (or CUDA with
--device cuda). A step is forward + flow-matching loss + backward + AdamW step.

Prints each mode's median step time, the measured speed-up and the speed-up expected from FLOPs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hdm_model import XUTConfig, build_denoiser, build_optimizer, interpolate, velocity_target
from hdm_model.flops import denoiser_flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--mlp-dim", type=int, default=768)
    ap.add_argument("--res", type=int, default=256, help="image side in pixels (latent = res / 8)")
    ap.add_argument("--text-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rate", type=float, default=0.5, help="TREAD rate (fraction routed)")
    ap.add_argument("--rounds", type=int, default=6, help="measured steps per mode")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    config = XUTConfig(dim=args.dim, ctx_dim=args.dim, heads=args.dim // args.head_dim, head_dim=args.head_dim,
                       mlp_dim=args.mlp_dim, tread_rate=args.rate)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_denoiser(config).to(device).train()
    opt = build_optimizer(model, base_lr=0.1, weight_decay=0.0)
    side = args.res // 8
    gen = torch.Generator(device=device).manual_seed(0)
    z0 = torch.randn(args.batch, 4, side, side, device=device, generator=gen)
    noise = torch.randn(z0.shape, device=device, generator=gen)
    t = torch.sigmoid(torch.randn(args.batch, device=device, generator=gen))
    ctx = torch.randn(args.batch, args.text_tokens, config.ctx_dim, device=device, generator=gen)
    x_t, target = interpolate(z0, noise, t), velocity_target(z0, noise)

    def step(rate: float) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        v = model(x_t, t, ctx, tread_rate=rate, generator=gen)
        loss = torch.nn.functional.mse_loss(v, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    modes = {"dense": 0.0, f"tread {args.rate}": args.rate}
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.warmup):
        for rate in modes.values():
            step(rate)
    for i in range(args.rounds):
        order = list(modes.items()) if i % 2 == 0 else list(modes.items())[::-1]  # alternate who goes first
        for name, rate in order:
            times[name].append(step(rate))

    n_image = (side // config.patch_size) ** 2
    flops = {name: denoiser_flops(config, n_image=n_image, n_text=args.text_tokens, tread_rate=rate)
             for name, rate in modes.items()}
    dense, routed = modes
    med = {name: statistics.median(ts) for name, ts in times.items()}
    measured = med[dense] / med[routed]
    expected = flops[dense] / flops[routed]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device {device}, threads {torch.get_num_threads()}, params {n_params / 1e6:.2f}M, batch {args.batch}, "
          f"{n_image} image + {args.text_tokens} text tokens, {args.rounds} alternating rounds")
    for name in modes:
        print(f"  {name:>10}: median step {med[name] * 1e3:8.1f} ms "
              f"(min {min(times[name]) * 1e3:.1f}, max {max(times[name]) * 1e3:.1f}); "
              f"forward {flops[name] / 1e9:.2f} GFLOP/sample")
    print(f"speed-up measured {measured:.3f}x, expected from FLOPs {expected:.3f}x, "
          f"ratio {measured / expected:.1%} of expected")


if __name__ == "__main__":
    main()
