"""benchmarks/gpu_check.py at smoke sizes on CPU: the whole step runs, and its FLOP count is the model's."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_on_cpu_reports_throughput_and_mfu(capsys):
    result = _load().main(["--smoke", "--device", "cpu", "--peak-tflops", "1"])
    out = capsys.readouterr().out
    assert result["samples_per_s"] > 0 and math.isfinite(result["loss"])
    assert 0 < result["mfu"] < result["mfu_with_text"]
    assert "samples/s per GPU" in out and "HDM reference 60.9" in out


def test_text_encoder_flops_count_every_linear_layer():
    from transformers import Qwen3Config, Qwen3Model

    gpu_check = _load()
    config = Qwen3Config(**gpu_check.SMOKE_TEXT)
    linear = sum(m.weight.numel() for m in Qwen3Model(config).modules() if isinstance(m, torch.nn.Linear))
    tokens = 16
    attention = config.num_hidden_layers * 2 * 2 * tokens**2 * config.num_attention_heads * config.head_dim
    assert gpu_check.text_encoder_flops(config, tokens) == 2 * linear * tokens + attention
