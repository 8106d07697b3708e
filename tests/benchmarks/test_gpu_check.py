"""benchmarks/gpu_check.py at smoke sizes on CPU: every case writes its line, a failing or late case does not stop
the run, nothing imports Ray or MLflow, the step is the trainer's own, and the FLOP and MFU arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_parts
from tests.benchmarks import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
# the smoke run, in a fresh interpreter; then the Ray and MLflow modules it imported (none may be)
RUN = """import json, runpy, sys
sys.argv = [{script!r}, "--smoke", "--device", "cpu", "--peak-tflops", "1", "--bandwidth-tbs", "0.1", "--out", {out!r}]
runpy.run_path({script!r}, run_name="__main__")
print("IMPORTED", json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "mlflow"))))
"""


def _load():
    return load_script("gpu_check")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(records by case, stdout) of one smoke run of every case."""
    out = tmp_path_factory.mktemp("gpu_check")
    run = subprocess.run([sys.executable, "-c", RUN.format(script=str(SCRIPT), out=str(out))], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {r["case"]: r for r in records}, run.stdout


def test_every_case_writes_its_line_and_nothing_imports_ray_or_mlflow(smoke):
    records, stdout = smoke
    assert list(records) == [*"abcdegf", "summary"]
    assert {k: r["status"] for k, r in records.items() if k != "summary"} == dict.fromkeys("abcdefg", "ok")
    for key in "abcdefg":
        assert f"[{key}] " in stdout
    assert json.loads(stdout.split("IMPORTED ", 1)[1]) == []
    assert records["a"]["residual_dtype"] == "torch.float32" and records["a"]["sdpa_backends"]  # CPU: no autocast
    variants = records["c"]["variants"]
    assert [(v["tread"], v["checkpointing"]) for v in variants] == [
        (t, p) for t in (0.0, 0.5) for p in ("none", "outer", "mlp", "full")]
    assert all(v["status"] == "ok" and v["samples_per_s"] > 0 for v in variants)
    assert set(records["d"]["kernel_ms"]) == {"gemm", "attention", "other"} and records["d"]["factor"] > 0
    assert records["f"]["compile"] == "blocks" and records["e"]["compile"] == "off"
    assert all(r["rows"] == r["images"] and r["job_images_per_s"] > 0 for r in records["g"]["resolutions"])


def test_the_full_step_is_the_trainers_step(smoke):
    """Case (e)'s losses are those of pipelines.train.step.TrainStep built here from the smoke stage (the
    recipe's checkpointing and text attention, TREAD 0.5, 16 text tokens, batch 2), seeded, then the text
    encoder and the denoiser initialised, fed the benchmark's batches: the same step, not a copy of it."""
    from pipelines.train.config import TrainStageConfig
    from pipelines.train.step import TrainStep, build_model

    gpu_check = _load()
    measured = smoke[0]["e"]
    cfg = TrainStageConfig(res=64, latents="unused", storage="unused", model="tiny", steps=2, batch_size=2,
                           grad_accum=1, tread_rate=0.5, ctx_length=16, compile="off")
    assert measured["checkpointing"] == cfg.checkpointing == TrainStageConfig(
        res=256, latents="unused", storage="unused").checkpointing
    bench = gpu_check.make_bench(gpu_check.parse_args(["--smoke", "--device", "cpu"]))
    torch.manual_seed(gpu_parts.SEED)
    text_encoder = gpu_parts.build_text_encoder(bench, length=16, attn=cfg.text_attn)
    step = TrainStep.for_stage(cfg, build_model(cfg, ctx_dim=32, device=torch.device("cpu")).train(),
                               device=torch.device("cpu"), encode_text=lambda b: text_encoder.encode_tokens(b.tokens))
    losses = []
    for batch in gpu_parts.synthetic_batches(2, batch_size=2, channels=4, side=8, text_encoder=text_encoder,
                                             caption_dropout=cfg.caption_dropout):
        assert step.micro_step(batch)
        losses.append(float(step.optimizer_step().loss))
    assert measured["losses"] == pytest.approx(losses, rel=1e-6, abs=0)


def test_mfu_and_projection_arithmetic(smoke):
    """MFU: samples/s x (3x the denoiser's forward + the text encoder's forward) over the 1 TFLOP/s peak given;
    the H100 projection divides by the (d) split's factor."""
    from transformers import Qwen3Config

    from hdm_model import XUTConfig
    from hdm_model.flops import denoiser_flops

    records = smoke[0]
    e = records["e"]
    denoiser = 3 * denoiser_flops(XUTConfig.preset("tiny"), n_image=16, n_text=16, tread_rate=0.5)
    text = gpu_parts.text_encoder_flops(Qwen3Config(**gpu_parts.SMOKE_TEXT), 16)
    assert e["mfu"] == pytest.approx(e["samples_per_s"] * (denoiser + text) / 1e12, rel=1e-9)
    assert e["mfu_denoiser"] == pytest.approx(e["samples_per_s"] * denoiser / 1e12, rel=1e-9)
    assert e["projection_basis"] == "kernel split (d)"
    assert e["h100_samples_per_s"] == pytest.approx(e["samples_per_s"] / records["d"]["factor"], rel=1e-9)
    assert records["summary"]["target_h100"] == pytest.approx(
        records["f"]["samples_per_s"] / records["d"]["factor"], rel=1e-9)


def test_a_failing_case_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    gpu_check = _load()

    def broken(bench):
        raise RuntimeError("planted")

    def out_of_memory(bench):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")

    monkeypatch.setitem(gpu_check.CASES, "a", ("probe", broken))
    monkeypatch.setitem(gpu_check.CASES, "b", ("text encoder", out_of_memory))
    monkeypatch.setitem(gpu_check.CASES, "c", ("denoiser eager", lambda bench: {"summary": "fine"}))
    gpu_check.main(["--smoke", "--device", "cpu", "--cases", "a,b,c", "--out", str(tmp_path)])
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["case"], r["status"]) for r in lines[:3]] == [("a", "error"), ("b", "oom"), ("c", "ok")]
    assert lines[0]["error"] == "RuntimeError: planted" and "planted" in lines[0]["traceback"]
    assert lines[1]["error"].startswith("CUDA out of memory") and lines[3]["case"] == "summary"
    assert "[a] probe: error" in capsys.readouterr().out


def test_cases_past_the_budget_are_skipped(tmp_path):
    gpu_check = _load()
    gpu_check.main(["--smoke", "--device", "cpu", "--cases", "a,e", "--budget-s", "0", "--out", str(tmp_path)])
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["case"], r["status"]) for r in lines[:2]] == [("a", "skipped"), ("e", "skipped")]
    assert "budget" in lines[0]["reason"] and lines[2]["target_h100"] is None


def test_text_encoder_flops_count_every_linear_layer():
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(**gpu_parts.SMOKE_TEXT)
    linear = sum(m.weight.numel() for m in Qwen3Model(config).modules() if isinstance(m, torch.nn.Linear))
    tokens = 16
    attention = config.num_hidden_layers * 2 * 2 * tokens**2 * config.num_attention_heads * config.head_dim
    assert gpu_parts.text_encoder_flops(config, tokens) == 2 * linear * tokens + attention


def test_attention_kernel_names_are_classified():
    names = {"void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>": "flash",
             "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": "efficient",
             "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3": "cudnn",
             "aten::_scaled_dot_product_attention_math": "math", "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTT": None}
    assert {name: gpu_parts.attention_backend(name) for name in names} == names
    assert gpu_parts.kernel_category("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTT") == "gemm"
    assert gpu_parts.kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "gemm"
    assert gpu_parts.kernel_category("void at::native::vectorized_elementwise_kernel<4>") == "other"
