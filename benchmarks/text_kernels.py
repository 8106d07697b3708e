"""The text encoder's attention kernels on padded caption batches, against the masked eager computation.

The original passes the padding mask to Qwen3 (right padding to max_length) and the denoiser attends every
position, pads included: a kernel may replace another only if it gives every state, pads included, what the
masked computation gives, up to the dtype's rounding. Kernels (transformers' attention implementations):
  eager           masked; matmul + softmax in transformers: the reference
  sdpa            masked; torch SDPA with a (B, 1, T, T) mask, which rules out the CUDA flash kernel (CUDA takes
                  the memory-efficient or the cuDNN kernel, the CPU its flash kernel, which takes masks)
  flex_attention  masked; torch.compile'd flex_attention with a block mask (compiled at its first call)
  sdpa-unmasked   no mask: causal SDPA, the flash kernel on CUDA. With causal attention and right padding the
                  real tokens keep their states, but a pad then attends the pads before it: its state changes,
                  so this is NOT the original's computation; it is measured to show that, and what it would gain.

Each row: ms per batch (median of `reps`), the first call's seconds (compilation, kernel selection), the SDPA
backend torch picks for the kernel's calls, and against eager: max |difference| over all states, max and
relative RMS difference over the attended positions (real tokens, and the one pad an empty prompt attends) and
over the pads apart, and whether all states match within the dtype's tolerance. A kernel that cannot run gets
an error string instead.

    python -m benchmarks.text_kernels                  # a small Qwen3 on CPU, fp32
    python -m benchmarks.text_kernels --shape qwen3-0.6b --device cuda --dtype bfloat16 --batch 128
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time

import torch
from torch import Tensor

from hdm_model.text_encoder import encode_ids

KERNELS = ("eager", "sdpa", "flex_attention", "sdpa-unmasked")
# (max |difference|, relative RMS difference) within which a kernel's states count as the masked computation's.
# A max alone grows with the batch (more states, larger outliers): the RMS bound holds at any batch, the max
# bounds single states. Masked SDPA against eager on CPU, Qwen3-0.6B's shape (28 layers, unit-RMS states):
# bf16 RMS 0.015 (max 0.13 over 2M states), fp16 RMS 0.002 (max 0.013); a dropped mask moves pads by RMS 0.5.
TOLERANCE = {torch.float32: (1e-3, 1e-5), torch.bfloat16: (0.5, 0.05), torch.float16: (0.1, 0.01)}
SHAPES = {  # Qwen3 configurations: "small" for CPU runs, Qwen3-0.6B's own (weights random)
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                  intermediate_size=768, vocab_size=4096),
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072, vocab_size=151936),
}


def caption_batch(batch: int, length: int, *, vocab_size: int, pad_id: int, seed: int,
                  empty_share: float = 0.1) -> tuple[Tensor, Tensor]:
    """Token ids and padding mask (B, T) as `TextEncoder.tokenize` makes them for max_length: caption lengths
    log-normal around 40% of `length` (truncated to it), a share `empty_share` empty (caption dropout: one
    attended pad), right padding with `pad_id`."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(batch, generator=gen) * 0.5 + math.log(0.4 * length)).long().clamp(1, length)
    lengths[torch.rand(batch, generator=gen) < empty_share] = 0
    real = torch.arange(length)[None] < lengths[:, None]
    ids = torch.randint(0, vocab_size, (batch, length), generator=gen)
    ids = torch.where(real & (ids != pad_id), ids, (pad_id + 1) % vocab_size).masked_fill(~real, pad_id)
    mask = real.long()
    mask[lengths == 0, 0] = 1
    return ids, mask


@contextlib.contextmanager
def sdpa_backend_probe(seen: list[str]):
    """Within: the SDPA backend torch selects for each scaled_dot_product_attention call is appended to
    `seen` (asked with the call's own arguments), then the call runs as usual."""
    from torch.nn.attention import SDPBackend

    original = torch.nn.functional.scaled_dot_product_attention

    def probe(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        try:
            seen.append(SDPBackend(torch._fused_sdp_choice(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                           is_causal=is_causal, scale=scale,
                                                           enable_gqa=enable_gqa)).name)
        except (TypeError, RuntimeError, ValueError) as error:  # a private API: a torch that differs is no failure
            seen.append(f"unknown ({type(error).__name__})")
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)

    torch.nn.functional.scaled_dot_product_attention = probe
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def elapsed_ms(fn, device: torch.device) -> float:
    """Milliseconds of one call of `fn`, from launch to the device being done (CUDA events on GPU)."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end)


def kernel_call(model, kernel: str, ids: Tensor, mask: Tensor):
    """A call that runs `model` with `kernel` on the batch, through the text encoder's own `encode_ids`."""
    model.set_attn_implementation("sdpa" if kernel == "sdpa-unmasked" else kernel)
    return lambda: encode_ids(model, ids, None if kernel == "sdpa-unmasked" else mask)


def differences(states: Tensor, reference: Tensor, mask: Tensor) -> dict:
    """Max |difference| over all states; max and relative RMS difference over the attended positions and over
    the pads apart (a change confined to pads must not hide among the real tokens); whether all match."""
    diff, reference = states.float() - reference.float(), reference.float()
    row = {"max_abs_diff": diff.abs().max().item()}
    for name, where in (("attended", mask.bool()), ("pad", ~mask.bool())):
        part, ref = diff[where], reference[where]  # (N, hidden)
        row[f"max_abs_diff_{name}"] = part.abs().max().item() if part.numel() else 0.0
        row[f"rel_rms_diff_{name}"] = (part.norm() / ref.norm()).item() if part.numel() else 0.0
    max_abs, rel_rms = TOLERANCE.get(states.dtype, TOLERANCE[torch.float32])
    rms = max(row["rel_rms_diff_attended"], row["rel_rms_diff_pad"])
    row["exact"] = row["max_abs_diff"] <= max_abs and rms <= rel_rms
    row["tolerance"] = f"max|d| <= {max_abs}, rms(d)/rms(states) <= {rel_rms} (attended, pads)"
    return row


def measure(model, kernel: str, ids: Tensor, mask: Tensor, *, reps: int) -> tuple[dict, Tensor]:
    """(timings and the SDPA backend, the states) of one kernel."""
    device = ids.device
    call = kernel_call(model, kernel, ids, mask)
    seen: list[str] = []
    start = time.perf_counter()
    with sdpa_backend_probe(seen):
        states = call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_s = time.perf_counter() - start
    call()  # a second warm-up: allocator, autotuning
    ms = statistics.median(elapsed_ms(call, device) for _ in range(reps))
    return {"ms": ms, "first_call_s": first_s, "sdpa_backend": ",".join(sorted(set(seen))) or None}, states


@torch.no_grad()
def compare_kernels(config, *, device: torch.device | str, dtype: torch.dtype, batch: int, length: int,
                    lengths_seed: int = 0, kernels: tuple[str, ...] = KERNELS, reps: int = 3) -> list[dict]:
    """One row per kernel for a randomly initialised model of `config` (a transformers config, e.g. Qwen3's;
    seed torch before calling for the same weights) on `batch` captions padded to `length`: see the module
    docstring. The masked eager computation is the reference: it runs first, and is a row (the first) when in
    `kernels`."""
    from transformers import AutoModel

    device = torch.device(device)
    with device:
        model = AutoModel.from_config(config).to(dtype).eval()
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    ids, mask = (t.to(device) for t in caption_batch(batch, length, vocab_size=config.vocab_size, pad_id=pad_id,
                                                      seed=lengths_seed))
    rows, reference = [], None
    for kernel in dict.fromkeys(("eager", *kernels)):  # the reference first
        row = {"kernel": kernel}
        try:
            timing, states = measure(model, kernel, ids, mask, reps=reps)
            row.update(timing)
            if kernel == "eager":
                reference = states
            elif reference is not None:
                row.update(differences(states, reference, mask))
        except Exception as error:  # a kernel that cannot run here is a result, not a failure
            row["error"] = f"{type(error).__name__}: {error}"[:500]
        if kernel in kernels:
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    """The rows as a fixed-width table (differences against eager: max over all states, relative RMS over the
    attended positions and over the pads)."""
    print(f"{'kernel':<15} {'ms':>9} {'first s':>8} {'sdpa backend':<20} {'max|d|':>9} {'rms attended':>12} "
          f"{'rms pads':>9} exact")
    for row in rows:
        if "error" in row:
            print(f"{row['kernel']:<15} error: {row['error']}")
            continue
        diffs = " ".join(f"{row[k]:>{w}.1e}" if k in row else f"{'ref':>{w}}" for k, w in
                         (("max_abs_diff", 9), ("rel_rms_diff_attended", 12), ("rel_rms_diff_pad", 9)))
        print(f"{row['kernel']:<15} {row['ms']:>9.1f} {row['first_call_s']:>8.1f} {str(row['sdpa_backend']):<20} "
              f"{diffs} {row.get('exact', '-')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--kernels", default=",".join(KERNELS))
    args = parser.parse_args()
    from transformers import Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(**SHAPES[args.shape], max_position_embeddings=4096, pad_token_id=0)
    print(f"torch {torch.__version__}, {args.shape} Qwen3 ({config.num_hidden_layers} layers, random weights), "
          f"{args.device} {args.dtype}, batch {args.batch} x {args.length} tokens")
    print_table(compare_kernels(config, device=args.device, dtype=getattr(torch, args.dtype), batch=args.batch,
                                length=args.length, kernels=tuple(args.kernels.split(",")), reps=args.reps))


if __name__ == "__main__":
    main()
