"""The building blocks of benchmarks/gpu_check.py (its docstring describes the check): the sizes measured, the
GPU tables, `Bench` (what every case shares: the MFU and the H100 projection), FLOP counts, the training stage's
step with a text encoder and batches made ahead, the timed loops, the profiler's kernel classification and the
probe's measurements. Imported as `benchmarks.gpu_parts` (gpu_check puts the repository root on sys.path)."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from hdm_model.flops import denoiser_flops
from pipelines.train.batches import MicroBatch
from pipelines.train.config import TrainStageConfig
from pipelines.train.step import TrainStep, build_model

H100_SXM = dict(tflops=989.0, tb_s=3.35)  # dense bf16, HBM3
PEAK_BF16_TFLOPS = [  # dense bf16, first match in the device name wins
    ("H100 PCIe", 756), ("H100", 989), ("GH200", 989), ("H200", 989), ("A100", 312), ("L40S", 362),
    ("RTX 5090", 209), ("RTX 4090", 165)]
BANDWIDTH_TB_S = [  # nominal memory bandwidth, same matching
    ("H100 PCIe", 2.0), ("H100", 3.35), ("GH200", 4.0), ("H200", 4.8), ("A100", 2.0), ("L40S", 0.864),
    ("RTX 5090", 1.792), ("RTX 4090", 1.008)]
QWEN3_06B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=3072, vocab_size=151936)
SMOKE_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  intermediate_size=64, vocab_size=1000)
SDXL_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024,
                scaling_factor=0.13025)
SMOKE_VAE = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=32,
                 scaling_factor=0.5)
SEED = 0  # the weights' init, captions, latents


@dataclass(frozen=True)
class Sizes:
    model: str
    res: int
    batch: int
    ctx_length: int
    warmup: int
    steps: int
    text: dict
    vae: dict
    vae_res: tuple[int, ...]
    vae_images: int  # per resolution
    copy_mib: int  # bandwidth probe
    gemm: int  # GEMM probe side


FULL = Sizes("xut-base", 256, 128, 256, 2, 5, QWEN3_06B, SDXL_VAE, (256, 512), 256, 2048, 8192)
SMOKE = Sizes("tiny", 64, 2, 16, 1, 1, SMOKE_TEXT, SMOKE_VAE, (32, 64), 4, 16, 128)


@dataclass
class Bench:
    """What every case shares: the device, the sizes, the GPU's peak rates and the H100 projection factor."""

    device: torch.device
    sizes: Sizes
    smoke: bool
    peak: float | None  # FLOP/s, dense bf16
    bandwidth: float | None  # B/s, nominal
    deadline: float  # time.perf_counter() at which the budget ends
    factor: float | None = None  # time on H100 SXM / time here, from the (d) split
    measured: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def mfu(self, flops_per_sample: float, samples_per_s: float) -> float | None:
        return samples_per_s * flops_per_sample / self.peak if self.peak else None

    def project(self, samples_per_s: float, *, compute_bound: bool = False) -> dict:
        """Samples/s on an H100 SXM: by the (d) split when known, else (or `compute_bound`) by peak FLOPs."""
        if self.peak is None:
            return {"h100_samples_per_s": None, "projection_basis": "unknown peak"}
        if self.factor is not None and not compute_bound:
            return {"h100_samples_per_s": samples_per_s / self.factor, "projection_basis": "kernel split (d)"}
        return {"h100_samples_per_s": samples_per_s * H100_SXM["tflops"] * 1e12 / self.peak,
                "projection_basis": "peak FLOPs"}


def text_encoder_flops(config, n_tokens: int) -> int:
    """Forward FLOPs of the Qwen3 stack for one caption: matmuls (embedding lookup excluded) + attention."""
    d, q, kv, mlp = config.hidden_size, config.num_attention_heads * config.head_dim, \
        config.num_key_value_heads * config.head_dim, config.intermediate_size
    per_token = 2 * (d * q + 2 * d * kv + q * d + 3 * d * mlp)
    attention = 2 * 2 * n_tokens * n_tokens * q
    return config.num_hidden_layers * (n_tokens * per_token + attention)


def table_value(table: list[tuple[str, float]], name: str) -> float | None:
    return next((value for key, value in table if key in name), None)


def memory_gib(bench: Bench) -> float | None:
    return torch.cuda.max_memory_allocated(bench.device) / 2**30 if bench.cuda else None


def fmt_pct(x: float | None) -> str:
    return f"{x:.1%}" if x is not None else "n/a"


def fmt_gib(x: float | None) -> str:
    return f"{x:.1f} GiB" if x is not None else "-"


# ---------------------------------------------------------------------------------------------------
# What the cases build: the stage's step, the text encoder with a tokenizer, batches made ahead

def stage_config(sizes: Sizes, **overrides) -> TrainStageConfig:
    """The training stage measured: the recipe's row for the resolution (lr, betas, decay, clipping, and
    checkpointing unless overridden), TREAD 0.5, one micro-step of `sizes.batch` per step, eager."""
    return TrainStageConfig(**{**dict(res=sizes.res, latents="unused", storage="unused", model=sizes.model,
                                      steps=sizes.warmup + sizes.steps, batch_size=sizes.batch, grad_accum=1,
                                      tread_rate=0.5, ctx_length=sizes.ctx_length, compile="off"), **overrides})


def build_step(bench: Bench, cfg: TrainStageConfig, *, ctx_dim: int, encode_text: Callable) -> TrainStep:
    """The trainer's step on a fresh denoiser built (and compiled) by the stage's own `build_model`."""
    with bench.device:  # initialise on the device: a large model initialised on CPU takes long
        model = build_model(cfg, ctx_dim=ctx_dim, device=bench.device)
    return TrainStep.for_stage(cfg, model.train(), encode_text=encode_text, device=bench.device)


def word_tokenizer(vocab_size: int):
    """Whitespace word-level tokenizer over ids 0..vocab_size-1 (words "w2"...; pad = eos = <|endoftext|>, id 0,
    as Qwen3 pads): captions of known token counts, no tokenizer downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_text_encoder(bench: Bench, *, length: int, attn: str):
    """hdm_model's TextEncoder over a randomly initialised Qwen3 of the sizes' shape (bf16 on GPU, as training
    loads it), with `attn` as its attention implementation."""
    from transformers import Qwen3Config, Qwen3Model

    from hdm_model.text_encoder import TextEncoder

    config = Qwen3Config(**bench.sizes.text, max_position_embeddings=4096, pad_token_id=0, attn_implementation=attn)
    with bench.device:
        model = Qwen3Model(config).to(torch.bfloat16 if bench.cuda else torch.float32)
    return TextEncoder(model, word_tokenizer(config.vocab_size), max_length=length)


def random_captions(n: int, *, max_words: int, vocab_size: int, dropout: float, generator) -> list[str]:
    """`n` captions of random words: lengths log-normal around 40% of `max_words` (the longest truncated to
    it by the tokenizer), a share `dropout` empty as caption dropout makes them."""
    lengths = torch.exp(torch.randn(n, generator=generator) * 0.5 + math.log(0.4 * max_words)).long().clamp(1)
    dropped = torch.rand(n, generator=generator) < dropout
    words = [torch.randint(2, vocab_size, (int(k),), generator=generator).tolist() for k in lengths]
    return ["" if drop else " ".join(f"w{i}" for i in ids) for ids, drop in zip(words, dropped)]


def synthetic_batches(n: int, *, batch_size: int, channels: int, side: int, text_encoder=None,
                      caption_dropout: float = 0.0, pin: bool = False) -> list[MicroBatch]:
    """`n` micro-batches of random square latents with their position maps, made ahead as the prefetch thread
    makes them: with `text_encoder`, random captions and their Tokens; with `pin`, pinned."""
    from hdm_model import crop_latent

    _, pos = crop_latent(torch.zeros(channels, side, side), offset=(0, 0))
    draws = torch.Generator().manual_seed(SEED)
    batches = []
    for _ in range(n):
        captions = [""] * batch_size
        if text_encoder is not None:
            captions = random_captions(batch_size, max_words=text_encoder.max_length, dropout=caption_dropout,
                                       vocab_size=text_encoder.model.config.vocab_size, generator=draws)
        batch = MicroBatch(latents=torch.randn(batch_size, channels, side, side, generator=draws),
                           positions=pos.repeat(batch_size, 1, 1), aspect=torch.zeros(batch_size),  # square
                           captions=captions, keys=[],
                           tokens=text_encoder.tokenize(captions) if text_encoder is not None else None)
        batches.append(batch.pin_memory() if pin else batch)
    return batches


def run_steps(bench: Bench, step: TrainStep, batches: list[MicroBatch], *, warmup: int) -> dict:
    """One micro-step + optimizer step per batch; the first `warmup` (kernel selection, compilation, allocator
    growth) timed apart. Losses are read after the last step, as the meter reads them at log time."""
    bench.sync()
    start, stats = time.perf_counter(), []
    for i, batch in enumerate(batches):
        if i == warmup:
            bench.sync()
            timed = time.perf_counter()
            if bench.cuda:
                torch.cuda.reset_peak_memory_stats(bench.device)
        step.micro_step(batch)
        stats.append(step.optimizer_step())
    bench.sync()
    elapsed = time.perf_counter() - timed
    n = len(batches) - warmup
    return {"warmup_s": timed - start, "step_ms": elapsed / n * 1e3,
            "samples_per_s": n * len(batches[0].captions) / elapsed,
            "losses": [float(s.loss) for s in stats], "peak_memory_gib": memory_gib(bench)}


def full_step(bench: Bench, *, compile_mode: str) -> tuple[TrainStep, object, list[MicroBatch], TrainStageConfig]:
    """The worker's step with the text encoder online: the recipe's checkpointing for the resolution, the
    stage's text attention, Tokens made (and pinned) ahead, encode_text = text_encoder.encode_tokens. Seeded
    once, then the text encoder and the denoiser are initialised in that order."""
    from hdm_model.compile import compile_text_encoder

    cfg = stage_config(bench.sizes, compile=compile_mode)
    torch.manual_seed(SEED)
    text_encoder = compile_text_encoder(build_text_encoder(bench, length=cfg.ctx_length, attn=cfg.text_attn),
                                        compile_mode)
    step = build_step(bench, cfg, ctx_dim=text_encoder.hidden_size,
                      encode_text=lambda batch: text_encoder.encode_tokens(batch.tokens))
    batches = synthetic_batches(bench.sizes.warmup + bench.sizes.steps, batch_size=cfg.batch_size,
                                channels=step.net.config.in_channels, side=cfg.res // 8, text_encoder=text_encoder,
                                caption_dropout=cfg.caption_dropout, pin=bench.cuda)
    return step, text_encoder, batches, cfg


def step_flops(step: TrainStep, cfg: TrainStageConfig, *, tread_rate: float, text_config=None) -> float:
    """Training FLOPs per sample: 3x the denoiser's forward, plus the text encoder's forward when given."""
    n_image = (cfg.res // 8 // step.net.config.patch_size) ** 2
    flops = 3 * denoiser_flops(step.net.config, n_image=n_image, n_text=cfg.ctx_length, tread_rate=tread_rate)
    return flops + (text_encoder_flops(text_config, cfg.ctx_length) if text_config is not None else 0)


# ---------------------------------------------------------------------------------------------------
# Kernel names: which SDPA backend, which share of the time

GEMM_MARKS = ("gemm", "nvjet", "xmma", "wgmma", "cutlass", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
              "aten::baddbmm")


def attention_backend(name: str) -> str | None:
    """The SDPA backend a kernel (or aten op) name belongs to: flash / efficient / cudnn / math, else None."""
    n = name.lower()
    if "cudnn" in n and any(k in n for k in ("sdpa", "fmha", "attention", "flash")):
        return "cudnn"  # cuDNN's Hopper SDPA kernels have "flash" in their names too
    if "flash" in n:
        return "flash"
    if "efficient" in n or "fmha" in n:
        return "efficient"
    if "attention_math" in n or "softmax" in n:
        return "math"
    return None


def kernel_category(name: str) -> str:
    if attention_backend(name):
        return "attention"
    return "gemm" if any(mark in name.lower() for mark in GEMM_MARKS) else "other"


def profiled_times(prof, bench: Bench) -> dict[str, float]:
    """ms per name: each CUDA kernel's time on GPU; on CPU each op's self time."""
    from torch.autograd import DeviceType

    times: dict[str, float] = {}
    if bench.cuda:
        for event in prof.events():
            if event.device_type == DeviceType.CUDA:
                times[event.name] = times.get(event.name, 0.0) + event.time_range.elapsed_us() / 1e3
    else:
        for event in prof.key_averages():
            times[event.key] = event.self_cpu_time_total / 1e3
    return times


@contextmanager
def profiling(bench: Bench):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.cuda else [])
    with profile(activities=activities) as prof:
        yield prof
        bench.sync()  # every kernel ends inside the trace


# ---------------------------------------------------------------------------------------------------
# Timing: a call repeated; compilation at smoke sizes

def timed_calls(bench: Bench, fn: Callable, *, warmup: int = 3, reps: int = 10) -> float:
    """Mean seconds per call of `fn`."""
    for _ in range(warmup):
        fn()
    bench.sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    bench.sync()
    return (time.perf_counter() - start) / reps


@contextmanager
def smoke_backend(bench: Bench):
    """On the smoke run, every torch.compile made meanwhile uses the aot_eager backend (it traces as inductor
    does, graph breaks included, but generates no code: seconds on CPU instead of minutes)."""
    if not bench.smoke:
        yield
        return
    from unittest import mock

    compile_ = torch.compile

    def aot_eager(*args, **kwargs):
        return compile_(*args, **{**kwargs, "backend": "aot_eager"})

    with mock.patch.object(torch, "compile", aot_eager):
        yield


# ---------------------------------------------------------------------------------------------------
# The probe's measurements: the step's residual dtype and SDPA backend, copy bandwidth, GEMM rate

def probe_step(bench: Bench) -> dict:
    """One micro-step of the stage's step (no checkpointing, batch 8) under the profiler, with a hook on the
    first transformer block: the residual stream's dtype and the attention backend actually run."""
    from hdm_model.layers import Block

    cfg = stage_config(bench.sizes, batch_size=min(8, bench.sizes.batch), checkpointing="none")
    torch.manual_seed(SEED)
    states = torch.randn(cfg.batch_size, cfg.ctx_length, bench.sizes.text["hidden_size"], device=bench.device)
    step = build_step(bench, cfg, ctx_dim=states.shape[-1], encode_text=lambda batch: states)
    seen = {}
    block = next(m for m in step.net.modules() if isinstance(m, Block))
    hook = block.register_forward_hook(lambda m, args, out: seen.update(x=str(args[0].dtype), out=str(out.dtype)))
    (batch,) = synthetic_batches(1, batch_size=cfg.batch_size, channels=step.net.config.in_channels, side=cfg.res // 8)
    with profiling(bench) as prof:
        step.micro_step(batch)
    hook.remove()
    names = profiled_times(prof, bench) if bench.cuda else {e.key: 0.0 for e in prof.key_averages()}
    attention = {name: attention_backend(name) for name in names if attention_backend(name)}
    ops = sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key or "_attention" in e.key})
    return {"residual_dtype": seen.get("out"), "block_input_dtype": seen.get("x"), "sdpa_ops": ops,
            "attention_kernels": attention, "sdpa_backends": sorted(set(attention.values()))}


def measure_copy(bench: Bench) -> float:
    """Device-to-device copy bandwidth in TB/s, bytes read plus written (mean of 10 after 3 warm-ups)."""
    src = torch.randn(bench.sizes.copy_mib * 2**18, device=bench.device)  # 4 bytes each
    dst = torch.empty_like(src)
    seconds = timed_calls(bench, lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / seconds / 1e12


def measure_gemm(bench: Bench) -> float:
    """bf16 (fp32 on CPU) n x n x n matrix product on random data, TFLOP/s."""
    n = bench.sizes.gemm
    dtype = torch.bfloat16 if bench.cuda else torch.float32
    a, b = (torch.randn(n, n, device=bench.device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / timed_calls(bench, lambda: a @ b) / 1e12
