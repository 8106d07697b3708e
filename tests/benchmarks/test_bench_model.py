"""benchmarks/bench_model.py at tiny sizes: each comparison runs and reports its ratio (no timing is asserted).

The comparison with the original implementation needs a checkout of KohakuBlueleaf/HDM's src/ folder
(HDM_ORIGINAL_SRC, default /tmp/hdm_original/src); CI has none, so those tests skip there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tests.benchmarks import load_script

ORIGINAL_SRC = Path(os.environ.get("HDM_ORIGINAL_SRC", "/tmp/hdm_original/src"))
TINY = ["--preset", "tiny", "--res", "32", "--text-tokens", "8", "--rounds", "2", "--warmup", "0", "--device", "cpu"]
needs_original = pytest.mark.skipif(not (ORIGINAL_SRC / "xut" / "xut.py").is_file(),
                                    reason=f"no checkout of the original HDM at {ORIGINAL_SRC} (HDM_ORIGINAL_SRC)")


def _load():
    return load_script("bench_model")


@pytest.fixture(scope="module")
def bench():
    return _load()


def test_tread_vs_dense(bench):
    result = bench.main(TINY)
    assert set(result["median_s"]) == {"dense", "tread 0.5"} and min(result["speedup"].values()) > 0
    assert result["expected"] > 1  # routing half the image tokens saves FLOPs


def test_compiled_vs_eager(bench):
    result = bench.main(["--compile", "--backend", "aot_eager", *TINY])
    assert set(result["median_s"]) == {"eager", "compiled"}
    assert min(result["ratio"].values()) > 0 and result["compile_s"] > 0


@needs_original
def test_ours_vs_the_original(bench):
    result = bench.main(["--original", str(ORIGINAL_SRC), *TINY])
    assert set(result["median_s"]) == {"ours", "original"} and min(result["ratio"].values()) > 0
    assert result["output_rel_diff"] <= 1e-4


@needs_original
def test_the_output_check_catches_a_different_weight(bench):
    """The agreement check is what makes the configs the same: one changed tensor fails it."""
    config = bench.XUTConfig.preset("tiny")
    ours = bench.build(config, torch.device("cpu"))
    theirs = bench.original_from_ours(ours, bench.import_original(ORIGINAL_SRC), n_text=8)
    data = bench.Inputs(config, batch=2, res=32, n_text=8, device=torch.device("cpu"))
    assert bench.check_outputs_agree(ours, theirs, data) <= 1e-4
    with torch.no_grad():
        theirs.out_patch.proj.bias.add_(0.01)
    with pytest.raises(AssertionError, match="differs from ours"):
        bench.check_outputs_agree(ours, theirs, data)
