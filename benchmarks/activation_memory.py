"""Activation memory of the denoiser per checkpointing policy, measured without computing (issue 16, item 2).

What is measured: the bytes of the tensors autograd saves for backward during one training forward (the
denoiser in training mode, TREAD at the preset's rate, flow-matching MSE), seen by
torch.autograd.graph.saved_tensors_hooks. Tensors that share a storage count once, by the storage's nbytes;
parameters are not activations and are left out (their bf16 autocast copies are counted, in the fixed part).
The inputs to a checkpointed region are saved through the same hooks, so every policy is measured alike.
Each configuration runs at batch 1 and 2: per sample = S(2) - S(1), fixed = S(1) - per sample.

How: under torch._subclasses.fake_tensor.FakeTensorMode with CPU fake tensors, so xut-base at 1024 px costs
no compute and no memory; the ops dispatch as on a real CPU tensor (same kernels chosen, same saved
tensors: tests/benchmarks/test_activation_memory.py checks byte-for-byte equality with a real run). The
meta device is NOT used: on meta, scaled_dot_product_attention falls back to the math kernel (saving the
N x N attention weights) and CPU autocast does not apply, so it would measure another program.
Precision: torch.autocast("cpu", bfloat16) stands in for the trainer's CUDA bf16 autocast (linear and matmul
outputs bf16, the residual stream fp32). Attention: the CPU flash kernel, which saves what CUDA's flash
kernel saves (q, k, v, output, an fp32 log-sum-exp per query).

Fit on one GPU: memory = model state + fixed + batch x (per sample + recompute working set), within
(1 - headroom) of the GPU. Model state: fp32 weights, fp32 grads, AdamW's two fp32 moments, an fp32 EMA
(20 bytes per denoiser parameter) and the frozen bf16 text encoder. The recompute working set of a policy that
recomputes is the per-sample saved bytes of the largest block without checkpointing (backward rebuilds one
block at a time), an upper bound for "mlp". Activation gradients and allocator slack are left to the headroom.
The default policy of a resolution is the one with the least recomputation (none < outer < mlp < full, in
forward FLOPs recomputed) whose largest batch fits the recipe's per-GPU batch.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from hdm_model import XUTConfig, build_denoiser  # noqa: E402
from hdm_model.config import Checkpointing  # noqa: E402
from hdm_model.flops import block_flops, denoiser_flops  # noqa: E402
from hdm_model.layers import Block  # noqa: E402
from hdm_model.tread import kept_image_tokens  # noqa: E402

POLICIES: tuple[Checkpointing, ...] = ("none", "outer", "mlp", "full")  # least recomputation first
RESOLUTIONS = (256, 512, 768, 1024)
MiB, GiB = 2**20, 2**30
TEXT_ENCODER_PARAMS = 0.6e9  # Qwen3-0.6B, frozen, bf16
STATE_BYTES_PER_PARAM = 4 * 5  # fp32 weights, grads, AdamW exp_avg and exp_avg_sq, EMA


def saved_bytes(model: nn.Module, *, batch: int, res: int, n_text: int, autocast: bool = True,
                per_block: dict[str, int] | None = None) -> int:
    """Bytes autograd saves for backward in one training forward + MSE of `model` on random inputs (fake or
    real, whatever mode is active): storages counted once, parameters left out. With `per_block`, the bytes
    first saved inside each Block (by module name) are added to it."""
    config = model.config
    side = res // 8
    z0 = torch.randn(batch, config.in_channels, side, side)
    noise, ctx, t = torch.randn_like(z0), torch.randn(batch, n_text, config.ctx_dim), torch.rand(batch)
    params = {id(p.untyped_storage()) for p in model.parameters()}
    storages: dict[int, torch.UntypedStorage] = {}  # kept alive so that ids stay unique
    current: list[str] = []  # the Block being run

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key not in params and key not in storages:
            storages[key] = storage
            if per_block is not None and current:
                per_block[current[-1]] = per_block.get(current[-1], 0) + storage.nbytes()
        return tensor

    def enter(name: str):
        return lambda module, args: current.append(name)  # returns None: the inputs stay as they are

    def leave(module, args, output) -> None:  # None: the output stays as it is
        current.pop()

    hooks = []
    if per_block is not None:
        for name, block in model.named_modules():
            if isinstance(block, Block):
                hooks += [block.register_forward_pre_hook(enter(name)), block.register_forward_hook(leave)]
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), cast:
            x_t = t.reshape(-1, 1, 1, 1) * noise + (1 - t.reshape(-1, 1, 1, 1)) * z0
            F.mse_loss(model(x_t, t, ctx).float(), (noise - z0).float())
    finally:
        for hook in hooks:
            hook.remove()
    return sum(s.nbytes() for s in storages.values())


def measure(config: XUTConfig, *, res: int, n_text: int, policies=POLICIES, fake: bool = True,
            autocast: bool = True) -> dict:
    """Per-sample and fixed saved bytes of each policy at `res`, and the largest block's per-sample bytes
    without checkpointing (the recompute working set); on fake tensors unless `fake` is False."""
    out: dict = {"policies": {}}
    with FakeTensorMode() if fake else nullcontext():
        for policy in policies:
            torch.manual_seed(0)
            model = build_denoiser(config, checkpointing=policy).train()
            blocks: list[dict[str, int]] = [{}, {}]
            s1, s2 = (saved_bytes(model, batch=b, res=res, n_text=n_text, autocast=autocast,
                                  per_block=blocks[b - 1] if policy == "none" else None) for b in (1, 2))
            out["policies"][policy] = {"per_sample": s2 - s1, "fixed": 2 * s1 - s2}
            if policy == "none":
                out["block_per_sample"] = max(blocks[1][k] - blocks[0][k] for k in blocks[0])
    return out


def recompute_flops(config: XUTConfig, *, res: int, n_text: int) -> dict[str, int]:
    """Forward FLOPs per sample each policy recomputes in backward (what orders them)."""
    n_image = (res // 8 // config.patch_size) ** 2
    full, routed = n_image + n_text, kept_image_tokens(n_image, config.tread_rate) + n_text
    outer = (config.pre_blocks + config.post_blocks) * block_flops(config, full)
    thin = config.replace(mlp_dim=1)  # a block minus (almost all of) its feed-forward
    u_blocks = config.depth * (config.enc_blocks + config.dec_blocks)
    mlp = ((config.pre_blocks + config.post_blocks) * (block_flops(config, full) - block_flops(thin, full))
           + u_blocks * (block_flops(config, routed) - block_flops(thin, routed)))
    return {"none": 0, "outer": outer, "mlp": mlp,
            "full": denoiser_flops(config, n_image=n_image, n_text=n_text, tread_rate=config.tread_rate)}


def max_batch(*, per_sample: int, fixed: int, working: int, state: int, gpu_bytes: float, headroom: float) -> int:
    """The largest batch whose state + fixed + batch x (per sample + working set) fits (1 - headroom) of the GPU."""
    free = gpu_bytes * (1 - headroom) - state - fixed
    return max(0, int(free // (per_sample + working)))


def report(config: XUTConfig, *, resolutions, n_text: int, gpu_gib: float, headroom: float,
           recipe_batch: dict[int, int], text_encoder_params: float = TEXT_ENCODER_PARAMS) -> dict:
    """Everything the table prints, as one JSON-able dict."""
    n_params = _count_params(config)
    state = STATE_BYTES_PER_PARAM * n_params + 2 * text_encoder_params
    rows = {}
    for res in resolutions:
        m = measure(config, res=res, n_text=n_text)
        flops = recompute_flops(config, res=res, n_text=n_text)
        for policy, row in m["policies"].items():
            row["working_per_sample"] = m["block_per_sample"] if policy != "none" else 0
            row["max_batch"] = max_batch(per_sample=row["per_sample"], fixed=row["fixed"],
                                         working=row["working_per_sample"], state=state,
                                         gpu_bytes=gpu_gib * GiB, headroom=headroom)
            row["recompute_gflop_per_sample"] = flops[policy] / 1e9
        want = recipe_batch.get(res)
        fits = [p for p in POLICIES if want is not None and m["policies"][p]["max_batch"] >= want]
        rows[res] = {"policies": m["policies"], "recipe_batch": want, "default": fits[0] if fits else None}
    return {"preset_params": n_params, "n_text": n_text, "tread_rate": config.tread_rate, "gpu_gib": gpu_gib,
            "headroom": headroom, "state_bytes": state, "measured_on": "FakeTensorMode (CPU), bf16 CPU autocast",
            "resolutions": rows}


def _count_params(config: XUTConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_denoiser(config).parameters())


def print_table(result: dict) -> None:
    print(f"saved activations per sample (MiB), {result['preset_params'] / 1e6:.0f}M params, "
          f"{result['n_text']} text tokens, TREAD {result['tread_rate']}, {result['measured_on']}")
    print(f"largest batch per {result['gpu_gib']:.0f} GiB GPU, {result['headroom']:.0%} headroom, after "
          f"{result['state_bytes'] / GiB:.1f} GiB of model state (fp32 weights, grads, AdamW, EMA; bf16 text encoder)")
    print(f"{'res':>5} {'tokens':>6} | " + " | ".join(f"{p:>22}" for p in POLICIES) + " | recipe batch -> default")
    for res, row in result["resolutions"].items():
        cells = [f"{r['per_sample'] / MiB:7.1f} MiB, batch {r['max_batch']:4d}"
                 for r in (row["policies"][p] for p in POLICIES)]
        print(f"{res:>5} {(res // 16) ** 2:>6} | " + " | ".join(f"{c:>22}" for c in cells)
              + f" | {row['recipe_batch']} -> {row['default']}")
    res = next(iter(result["resolutions"]))
    fixed = {p: r["fixed"] / MiB for p, r in result["resolutions"][res]["policies"].items()}
    print(f"fixed (batch-independent, mostly bf16 weight copies) at {res} px: "
          + ", ".join(f"{p} {v:.0f} MiB" for p, v in fixed.items()))
    print("recompute working set per sample (largest block, added for outer/mlp/full): "
          + ", ".join(f"{r} px {row['policies']['full']['working_per_sample'] / MiB:.1f} MiB"
                      for r, row in result["resolutions"].items()))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="xut-base")
    ap.add_argument("--res", type=int, nargs="+", default=list(RESOLUTIONS))
    ap.add_argument("--text-tokens", type=int, default=256)
    ap.add_argument("--tread-rate", type=float, default=0.5)
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory (H100 SXM: 80 GiB)")
    ap.add_argument("--headroom", type=float, default=0.10, help="share of the GPU kept free")
    ap.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    args = ap.parse_args(argv)

    from pipelines.train.config import RECIPE

    config = XUTConfig.preset(args.preset, tread_rate=args.tread_rate)
    result = report(config, resolutions=args.res, n_text=args.text_tokens, gpu_gib=args.gpu_gib,
                    headroom=args.headroom, recipe_batch={r: row["batch_size"] for r, row in RECIPE.items()})
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return result


if __name__ == "__main__":
    main()
