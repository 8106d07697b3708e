"""One-GPU training throughput of the released model size, against HDM's reference number.

What runs (flags override): the xut-base denoiser (343M) at 256 px (32x32x4 latents -> 256 image tokens)
with TREAD 0.5 and gradient checkpointing, as the recipe's 256 px stage; batch 128 per GPU; a randomly
initialised text encoder of Qwen3-0.6B's shape (28 layers, hidden 1024, 16 heads / 8 KV heads of 128,
SwiGLU 3072, vocabulary 151,936; built from its config, nothing downloaded) run forward EVERY step on 256
random token ids per caption (online, as HDM); random latents. The step is the trainer's own
(pipelines/train/step.py `TrainStep`, as a training stage's worker runs it): text encoder forward,
flow-matching loss under bf16 autocast with the step's seeded draws, backward, clipping, fused muP AdamW
with the recipe's lr, betas and decay and its warm-up + cosine schedule. `--warmup` steps (compilation of
kernels, allocator growth) are left out.

Prints samples/s per GPU, the model FLOPs utilisation (MFU) of the denoiser's training FLOPs alone (3x its
forward, `hdm_model.flops`; recomputation by checkpointing not counted, as usual for MFU) and with the text
encoder's forward added, against the GPU's dense bf16 peak (a table by device name, or --peak-tflops),
and HDM's reference: 60.9 samples/s per RTX 5090 with the VAE and text encoder online (our check has no
VAE: latents are given, as the precompute job makes them).

    bash benchmarks/gpu_check.sh                    # on one GPU, ~1-2 min
    .venv/bin/python benchmarks/gpu_check.py --smoke   # tiny sizes, 2 steps, runs on CPU (tests)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hdm_model.flops import denoiser_flops  # noqa: E402
from pipelines.train.batches import MicroBatch  # noqa: E402
from pipelines.train.config import TrainStageConfig  # noqa: E402
from pipelines.train.step import TrainStep, build_model  # noqa: E402

HDM_REFERENCE = 60.9  # samples/s per RTX 5090, 256 px, VAE and text encoder online (HDM report)
PEAK_BF16_TFLOPS = [  # dense bf16, first match in the device name wins
    ("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("GH200", 989), ("A100", 312), ("L40S", 362),
    ("RTX 5090", 209), ("RTX 4090", 165),
]
QWEN3_06B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=3072, vocab_size=151936)
SMOKE_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  intermediate_size=64, vocab_size=1000)
SEED = 0  # the weights' init, the captions' token ids and the latents


def text_encoder_flops(config, n_tokens: int) -> int:
    """Forward FLOPs of the Qwen3 stack for one caption: matmuls (embedding lookup excluded) + attention."""
    d, q, kv, mlp = config.hidden_size, config.num_attention_heads * config.head_dim, \
        config.num_key_value_heads * config.head_dim, config.intermediate_size
    per_token = 2 * (d * q + 2 * d * kv + q * d + 3 * d * mlp)
    attention = 2 * 2 * n_tokens * n_tokens * q
    return config.num_hidden_layers * (n_tokens * per_token + attention)


def peak_flops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override * 1e12, f"{override:g} TFLOPS (--peak-tflops)"
    if device.type != "cuda":
        return None, "unknown on CPU"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{tflops} TFLOPS dense bf16 ({key})"
    return None, f"unknown for {name!r}: pass --peak-tflops"


class RandomCaptions:
    """Text states of `length` random token ids per caption through a Qwen3 stack: the text encoder's
    forward at its real size, with no tokenizer or weights to fetch (the trainer's `encode_text`)."""

    def __init__(self, model, *, length: int, vocab_size: int, device: torch.device):
        self.model, self.length, self.vocab_size = model, length, vocab_size
        self.ids = torch.Generator(device=device).manual_seed(SEED)

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        ids = torch.randint(self.vocab_size, (len(captions), self.length), generator=self.ids,
                            device=self.ids.device)
        return self.model(input_ids=ids).last_hidden_state


def stage_config(args: argparse.Namespace) -> TrainStageConfig:
    """The training stage measured: the recipe's row for `args.res` (lr, betas, decay, clipping), the
    benchmark's batch and model options, no accumulation (a step is one micro-step of `batch_size`)."""
    return TrainStageConfig(res=args.res, latents="unused", storage="unused",
                            model="tiny" if args.smoke else "xut-base", steps=args.warmup + args.steps,
                            batch_size=args.batch_size, grad_accum=1, tread_rate=args.tread,
                            ctx_length=args.ctx_length, grad_checkpointing=not args.no_grad_checkpointing)


def synthetic_batches(n: int, *, batch_size: int, channels: int, side: int) -> list[MicroBatch]:
    """`n` micro-batches of random square latents with their position maps, made ahead (in training the
    prefetch thread makes them ahead too)."""
    from hdm_model import crop_latent

    _, pos = crop_latent(torch.zeros(channels, side, side), offset=(0, 0))
    draws = torch.Generator().manual_seed(SEED)
    return [MicroBatch(latents=torch.randn(batch_size, channels, side, side, generator=draws),
                       positions=pos.repeat(batch_size, 1, 1), aspect=torch.zeros(batch_size),  # log(W/H), square
                       captions=[""] * batch_size, keys=[]) for _ in range(n)]


def build(args: argparse.Namespace, device: torch.device) -> tuple[TrainStep, torch.nn.Module]:
    """(the trainer's step on a fresh denoiser, the text encoder it runs)."""
    from transformers import Qwen3Config, Qwen3Model

    config = stage_config(args)
    torch.manual_seed(SEED)
    text_config = Qwen3Config(**(SMOKE_TEXT if args.smoke else QWEN3_06B), max_position_embeddings=4096)
    with device:  # initialise on the device: a 0.6B model initialised on CPU takes long
        text_encoder = Qwen3Model(text_config).to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
        text_encoder.requires_grad_(False)
        model = build_model(config, ctx_dim=text_config.hidden_size)
    model.train()
    encode = RandomCaptions(text_encoder, length=args.ctx_length, vocab_size=text_config.vocab_size, device=device)
    return TrainStep.for_stage(config, model, encode_text=encode, device=device), text_encoder


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=128, help="per GPU (recipe: 128 at 256 px)")
    ap.add_argument("--steps", type=int, default=20, help="measured steps")
    ap.add_argument("--warmup", type=int, default=3, help="steps run before timing")
    ap.add_argument("--res", type=int, default=256, help="image side in px (latent side = res / 8)")
    ap.add_argument("--ctx-length", type=int, default=256, help="text tokens per caption")
    ap.add_argument("--tread", type=float, default=0.5, help="TREAD rate in training")
    ap.add_argument("--no-grad-checkpointing", action="store_true", help="the recipe checkpoints; this does not")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU, overriding the table")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny denoiser and text encoder, 64 px, 2 steps (CPU test)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch_size, args.steps, args.warmup, args.res, args.ctx_length = 2, 2, 1, 64, 16
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    device = torch.device(args.device)
    step, text_encoder = build(args, device)
    model, b = step.net, args.batch_size
    batches = synthetic_batches(args.warmup + args.steps, batch_size=b, channels=model.config.in_channels,
                                side=args.res // 8)
    losses = []
    for i, batch in enumerate(batches):
        if i == args.warmup:  # kernels compiled, allocator grown: time from here
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
        step.micro_step(batch)  # grad_accum 1: every micro-step completes a step
        losses.append(step.optimizer_step().loss)  # its grad norm's float() synchronises
    elapsed = time.perf_counter() - start
    return report(args, device, step=step, text_encoder=text_encoder, elapsed=elapsed, losses=losses)


def report(args: argparse.Namespace, device: torch.device, *, step: TrainStep, text_encoder: torch.nn.Module,
           elapsed: float, losses: list[float]) -> dict[str, float]:
    """Prints the measurement and returns it: samples/s, the losses (warm-up included), MFU when the peak is known."""
    model, b, side, text_config = step.net, args.batch_size, args.res // 8, text_encoder.config
    samples_per_s = b * args.steps / elapsed
    n_image = (side // model.config.patch_size) ** 2
    denoiser = 3 * denoiser_flops(model.config, n_image=n_image, n_text=args.ctx_length, tread_rate=args.tread)
    text = text_encoder_flops(text_config, args.ctx_length)
    peak, peak_note = peak_flops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {name}; denoiser {'tiny' if args.smoke else 'xut-base'} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M), text encoder "
          f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.1f}M, {args.res} px, {n_image} image + "
          f"{args.ctx_length} text tokens, TREAD {args.tread}, grad checkpointing {not args.no_grad_checkpointing}, "
          f"batch {b}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}; {args.steps} steps after "
          f"{args.warmup} warm-up")
    print(f"  step {elapsed / args.steps * 1e3:.1f} ms, last loss {losses[-1]:.4f}")
    if device.type == "cuda":
        print(f"  peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    print(f"  samples/s per GPU: {samples_per_s:.1f} (HDM reference {HDM_REFERENCE} per RTX 5090, VAE and text "
          f"encoder online: {samples_per_s / HDM_REFERENCE:.2f}x)")
    print(f"  model FLOPs per sample: denoiser training {denoiser / 1e12:.3f} TFLOP, text encoder forward "
          f"{text / 1e12:.3f} TFLOP")
    result = {"samples_per_s": samples_per_s, "loss": losses[-1], "losses": losses, "steps": args.steps,
              "warmup": args.warmup, "samples_per_step": b * step.grad_accum}
    if peak is None:
        print(f"  MFU: peak {peak_note}")
    else:
        result["mfu"] = samples_per_s * denoiser / peak
        result["mfu_with_text"] = samples_per_s * (denoiser + text) / peak
        print(f"  MFU vs {peak_note}: denoiser {result['mfu']:.1%}, denoiser + text encoder "
              f"{result['mfu_with_text']:.1%}")
    return result


if __name__ == "__main__":
    main()
