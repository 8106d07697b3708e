"""Training-step time of the XUT denoiser, ratios measured alternately in one run (never absolute targets).

A step is forward + flow-matching MSE + backward + AdamW step (muP groups, fused on CPU), the same function
for every model compared. Three comparisons, each on its own config (flags override):

  (default)        TREAD vs dense: the released topology at width 256 (4 heads x 64, SwiGLU 768), 256 px
                   (256 image tokens) with 256 text tokens, batch 2; prints the speed-up measured and the
                   one expected from FLOPs.
  --compile        compiled ("blocks": hdm_model.compile.compile_denoiser) vs eager, xut-small at CPU sizes
                   (128 px -> 64 image tokens, 64 text tokens, batch 2, TREAD 0.5); the compile time (the first
                   compiled step minus a compiled step) is reported apart from the step time.
  --original PATH  ours vs the original implementation (KohakuBlueleaf/HDM's XUDiT, imported at run time from
                   PATH = a checkout's `src` folder, with its xformers / liger / torch.compile switches off), same
                   xut-small config and CPU sizes, both eager, our weights loaded into it through
                   hdm_model.official's key table; the outputs are checked to agree before anything is timed.

Rounds alternate which model goes first. fp32 on CPU (or CUDA with --device cuda).
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from hdm_model import XUTConfig, build_denoiser, build_optimizer, interpolate, velocity_target  # noqa: E402
from hdm_model.flops import denoiser_flops  # noqa: E402

# The original's module switches (src/xut/env.py), read when its modules are imported: all off for CPU.
ORIGINAL_ENV = {"TORCH_COMPILE": False, "USE_LIGER": False, "USE_XFORMERS": False, "USE_XFORMERS_LAYERS": False,
                "USE_VANILLA": False}


class Inputs:
    """One fixed training batch: x_t, t, text states and the velocity target, on `device`."""

    def __init__(self, config: XUTConfig, *, batch: int, res: int, n_text: int, device: torch.device):
        gen = torch.Generator(device=device).manual_seed(0)
        side = res // 8
        z0 = torch.randn(batch, config.in_channels, side, side, device=device, generator=gen)
        noise = torch.randn(z0.shape, device=device, generator=gen)
        self.t = torch.sigmoid(torch.randn(batch, device=device, generator=gen))
        self.ctx = torch.randn(batch, n_text, config.ctx_dim, device=device, generator=gen)
        self.x_t, self.target = interpolate(z0, noise, self.t), velocity_target(z0, noise)
        self.generator = gen  # the TREAD draws of our model
        self.n_image = (side // config.patch_size) ** 2


def make_step(model: nn.Module, target: torch.Tensor) -> Callable[[Callable[[], torch.Tensor]], float]:
    """A timed training step of `model`: step(forward) runs forward() -> MSE against target -> backward ->
    AdamW and returns its seconds."""
    opt = build_optimizer(model, base_lr=0.1, weight_decay=0.0)
    device = target.device

    def step(forward: Callable[[], torch.Tensor]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = F.mse_loss(forward().float(), target.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def alternate(steps: dict[str, Callable[[], float]], *, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Step times of each entry, `warmup` untimed rounds first; each round reverses who goes first."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(rounds):
        order = list(steps.items()) if i % 2 == 0 else list(steps.items())[::-1]
        for name, step in order:
            times[name].append(step())
    return times


def summarise(times: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, float]]:
    """(median, min) seconds per entry, printed with the max. On a shared machine the min is the step least
    disturbed by other load, so ratios are printed of both."""
    med = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}
    for name, ts in times.items():
        print(f"  {name:>12}: median step {med[name] * 1e3:8.1f} ms (min {best[name] * 1e3:.1f}, "
              f"max {max(ts) * 1e3:.1f}, {len(ts)} steps)")
    return med, best


def ratio(a: str, b: str, med: dict[str, float], best: dict[str, float]) -> dict[str, float]:
    """Step time a / b, of the medians and of the minima."""
    return {"median": med[a] / med[b], "min": best[a] / best[b]}


def build(config: XUTConfig, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return build_denoiser(config).to(device).train()


def tread_vs_dense(config: XUTConfig, args, device: torch.device) -> dict:
    """Our model's step with TREAD at the config's rate against the same model dense."""
    model = build(config, device)
    data = Inputs(config, batch=args.batch, res=args.res, n_text=args.text_tokens, device=device)
    modes = {"dense": 0.0, f"tread {config.tread_rate}": config.tread_rate}
    step = make_step(model, data.target)

    def forward(rate: float) -> Callable[[], torch.Tensor]:
        return lambda: model(data.x_t, data.t, data.ctx, tread_rate=rate, generator=data.generator)

    steps = {name: functools.partial(step, forward(rate)) for name, rate in modes.items()}
    med, best = summarise(alternate(steps, rounds=args.rounds, warmup=args.warmup))
    flops = {name: denoiser_flops(config, n_image=data.n_image, n_text=args.text_tokens, tread_rate=r)
             for name, r in modes.items()}
    dense, routed = modes
    measured, expected = ratio(dense, routed, med, best), flops[dense] / flops[routed]
    print(f"speed-up measured {measured['median']:.3f}x (of minima {measured['min']:.3f}x), expected from FLOPs "
          f"{expected:.3f}x, ratio {measured['median'] / expected:.1%} of expected")
    return {"median_s": med, "min_s": best, "speedup": measured, "expected": expected}


def compiled_vs_eager(config: XUTConfig, args, device: torch.device) -> dict:
    """Our step eager against the same weights with every Block compiled (compile_denoiser "blocks")."""
    from hdm_model.compile import compile_denoiser

    eager = build(config, device)
    compiled = compile_denoiser(copy.deepcopy(eager), "blocks", backend=args.backend)
    data = Inputs(config, batch=args.batch, res=args.res, n_text=args.text_tokens, device=device)
    steps = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        forward = functools.partial(model, data.x_t, data.t, data.ctx, generator=data.generator)
        steps[name] = functools.partial(make_step(model, data.target), forward)
    first = steps["compiled"]()  # traces and compiles every block shape of a training step
    med, best = summarise(alternate(steps, rounds=args.rounds, warmup=args.warmup))
    compile_s = first - med["compiled"]
    r = ratio("compiled", "eager", med, best)
    print(f"compile time {compile_s:.1f} s (first compiled step {first:.1f} s, backend {args.backend}); "
          f"step time compiled / eager {r['median']:.3f} (of minima {r['min']:.3f})")
    return {"median_s": med, "min_s": best, "compile_s": compile_s, "ratio": r}


def import_original(src: Path) -> type[nn.Module]:
    """The original's XUDiT class from a checkout's `src` folder, its switches set for CPU before its modules
    are imported (they read them at import time)."""
    if not (src / "xut" / "xut.py").is_file():
        raise FileNotFoundError(f"{src} is not the original HDM's src folder (no xut/xut.py)")
    sys.path.insert(0, str(src))
    import xut.env as env

    for name, value in ORIGINAL_ENV.items():
        setattr(env, name, value)
    from xut.xut import XUDiT

    return XUDiT


def original_from_ours(model: nn.Module, xudit: type[nn.Module], *, n_text: int) -> nn.Module:
    """The original's XUDiT of our model's config holding our model's weights (official names)."""
    from hdm_model import ours_to_official
    from hdm_model.official import official_arch

    theirs = xudit(**official_arch(model.config, ctx_size=n_text))
    theirs.load_state_dict(ours_to_official(model, prefix=""), strict=True)
    return theirs.to(next(model.parameters()).device)


@torch.no_grad()
def check_outputs_agree(ours: nn.Module, theirs: nn.Module, data: Inputs, *, rtol: float = 1e-4) -> float:
    """Both models in eval mode without routing give the same velocity (relative max difference <= rtol):
    what makes them the same config. Returns the relative max difference."""
    ours.eval(), theirs.eval()
    try:
        a = ours(data.x_t, data.t, data.ctx)
        b = theirs(data.x_t, data.t, data.ctx)
    finally:
        ours.train(), theirs.train()
    diff = ((a - b).abs().max() / a.abs().max()).item()
    if not diff <= rtol:
        raise AssertionError(f"the original's output differs from ours by {diff:.2e} (relative max) > {rtol}")
    return diff


def ours_vs_original(config: XUTConfig, args, device: torch.device) -> dict:
    """Our eager step against the original implementation's on the same config, weights and batch."""
    ours = build(config, device)
    with torch.no_grad():  # random weights everywhere (the zero-initialised modulation too), so the check bites
        for name, p in ours.named_parameters():
            p.copy_(torch.randn_like(p) * 0.02 + (1.0 if "norm" in name else 0.0))  # norm gains near 1
    theirs = original_from_ours(ours, import_original(Path(args.original)), n_text=args.text_tokens)
    data = Inputs(config, batch=args.batch, res=args.res, n_text=args.text_tokens, device=device)
    diff = check_outputs_agree(ours, theirs, data)
    print(f"outputs agree: relative max difference {diff:.1e} (eval, no routing)")
    steps = {"ours": functools.partial(make_step(ours, data.target),
                                       functools.partial(ours, data.x_t, data.t, data.ctx, generator=data.generator)),
             "original": functools.partial(make_step(theirs, data.target),
                                           functools.partial(theirs, data.x_t, data.t, data.ctx))}
    med, best = summarise(alternate(steps, rounds=args.rounds, warmup=args.warmup))
    r = ratio("ours", "original", med, best)
    print(f"step time ours / original {r['median']:.3f} (of minima {r['min']:.3f}; both eager, "
          f"TREAD {config.tread_rate})")
    return {"median_s": med, "min_s": best, "ratio": r, "output_rel_diff": diff}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--compile", action="store_true", help="compiled vs eager (default: TREAD vs dense)")
    what.add_argument("--original", metavar="PATH", help="ours vs the original HDM, PATH = its checkout's src/")
    ap.add_argument("--preset", help="model preset (default: xut-small with --compile/--original, else the "
                                     "--dim/--head-dim/--mlp-dim config)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--mlp-dim", type=int, default=768)
    ap.add_argument("--res", type=int, help="image side in pixels (latent = res / 8); default 256, 128 with "
                                            "--compile/--original")
    ap.add_argument("--text-tokens", type=int, help="default 256, 64 with --compile/--original")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rate", type=float, default=0.5, help="TREAD rate (fraction routed)")
    ap.add_argument("--rounds", type=int, default=6, help="measured steps per model")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--backend", default="inductor", help="torch.compile backend for --compile")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    small = args.compile or args.original is not None
    args.res = args.res or (128 if small else 256)
    args.text_tokens = args.text_tokens or (64 if small else 256)
    preset = args.preset or ("xut-small" if small else None)
    if preset is not None:
        config = XUTConfig.preset(preset, tread_rate=args.rate)
    else:
        config = XUTConfig(dim=args.dim, ctx_dim=args.dim, heads=args.dim // args.head_dim, head_dim=args.head_dim,
                           mlp_dim=args.mlp_dim, tread_rate=args.rate)
    device = torch.device(args.device)
    n_params = sum(p.numel() for p in build_denoiser(config).parameters())
    print(f"device {device}, threads {torch.get_num_threads()}, {preset or 'custom'} {n_params / 1e6:.2f}M params, "
          f"batch {args.batch}, {(args.res // 8 // config.patch_size) ** 2} image + {args.text_tokens} text tokens, "
          f"TREAD {config.tread_rate}, {args.rounds} alternating rounds after {args.warmup} warm-up")
    run = compiled_vs_eager if args.compile else ours_vs_original if small else tread_vs_dense
    return run(config, args, device)


if __name__ == "__main__":
    main()
