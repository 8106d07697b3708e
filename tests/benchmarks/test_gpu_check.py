"""benchmarks/gpu_check.py at smoke sizes on CPU: it runs the trainer's step, and its FLOP count is the model's."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_on_cpu_reports_throughput_and_mfu(capsys):
    gpu_check = _load()
    result = gpu_check.main(["--smoke", "--device", "cpu", "--peak-tflops", "1"])
    out = capsys.readouterr().out
    # --smoke: 1 warm-up step, then 2 timed steps of one micro-batch of 2
    assert (result["warmup"], result["steps"], result["samples_per_step"]) == (1, 2, 2)
    assert len(result["losses"]) == 3 and result["loss"] == result["losses"][-1]
    assert result["samples_per_s"] > 0 and all(math.isfinite(x) for x in result["losses"])
    # MFU: samples/s x the denoiser's training FLOPs (3x its forward) over the 1 TFLOPS peak; plus the text
    # encoder's forward for the other figure
    from transformers import Qwen3Config

    from hdm_model import XUTConfig
    from hdm_model.flops import denoiser_flops

    denoiser = 3 * denoiser_flops(XUTConfig.preset("tiny"), n_image=16, n_text=16, tread_rate=0.5)
    text = gpu_check.text_encoder_flops(Qwen3Config(**gpu_check.SMOKE_TEXT), 16)
    assert result["mfu"] == pytest.approx(result["samples_per_s"] * denoiser / 1e12, rel=1e-9)
    assert result["mfu_with_text"] == pytest.approx(result["samples_per_s"] * (denoiser + text) / 1e12, rel=1e-9)
    assert "samples/s per GPU" in out and "HDM reference 60.9" in out


def test_the_benchmark_runs_the_trainers_step():
    """Its losses are those of pipelines.train.step.TrainStep built from the 64 px stage the smoke run names
    (the recipe's lr, betas, decay and clip; TREAD 0.5, checkpointing, 16 text tokens, batch 2), fed the
    benchmark's inputs: the same step, not a copy of it (design.md, rule 13)."""
    from transformers import Qwen3Config, Qwen3Model

    from pipelines.train.config import TrainStageConfig
    from pipelines.train.step import TrainStep, build_model

    gpu_check = _load()
    measured = gpu_check.main(["--smoke", "--device", "cpu"])["losses"]

    cfg = TrainStageConfig(res=64, latents="unused", storage="unused", model="tiny", steps=3, batch_size=2,
                           grad_accum=1, tread_rate=0.5, ctx_length=16, grad_checkpointing=True)
    torch.manual_seed(gpu_check.SEED)
    text_encoder = Qwen3Model(Qwen3Config(**gpu_check.SMOKE_TEXT, max_position_embeddings=4096)).eval()
    model = build_model(cfg, ctx_dim=32).train()
    cpu = torch.device("cpu")
    step = TrainStep.for_stage(cfg, model, device=cpu, encode_text=gpu_check.RandomCaptions(
        text_encoder, length=16, vocab_size=gpu_check.SMOKE_TEXT["vocab_size"], device=cpu))
    losses = []
    for batch in gpu_check.synthetic_batches(3, batch_size=2, channels=4, side=8):
        assert step.micro_step(batch)
        losses.append(step.optimizer_step().loss)
    assert measured == losses


def test_text_encoder_flops_count_every_linear_layer():
    from transformers import Qwen3Config, Qwen3Model

    gpu_check = _load()
    config = Qwen3Config(**gpu_check.SMOKE_TEXT)
    linear = sum(m.weight.numel() for m in Qwen3Model(config).modules() if isinstance(m, torch.nn.Linear))
    tokens = 16
    attention = config.num_hidden_layers * 2 * 2 * tokens**2 * config.num_attention_heads * config.head_dim
    assert gpu_check.text_encoder_flops(config, tokens) == 2 * linear * tokens + attention
