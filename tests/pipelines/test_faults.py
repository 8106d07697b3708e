"""pipelines/faults.py: the chaos suite's fault points fire where configured, in real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from pipelines import faults

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(env_faults: dict, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HDM_FAULTS=json.dumps(env_faults), PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_inert_without_the_variable(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.inject("prepare.kill", ["a"])  # returns: nothing configured


def test_raise_fires_only_for_configured_keys(monkeypatch):
    monkeypatch.setenv(faults.ENV, json.dumps({"prepare.raise": ["bad.jpg"]}))
    faults.inject("prepare.raise", ["good.jpg"])
    faults.inject("encode.raise", ["bad.jpg"])  # another point
    with pytest.raises(RuntimeError, match="injected fault prepare.raise at bad.jpg"):
        faults.inject("prepare.raise", ["good.jpg", "bad.jpg"])


def test_oom_raises_torch_out_of_memory(monkeypatch):
    import torch

    monkeypatch.setenv(faults.ENV, json.dumps({"encode.oom": "*"}))
    with pytest.raises(torch.OutOfMemoryError):
        faults.inject("encode.oom", ["x"])


def test_kill_ends_the_process_by_sigkill():
    done = _run({"prepare.kill": ["k"]}, "from pipelines.faults import inject\ninject('prepare.kill', ['j'])\n"
                "print('survived j', flush=True)\ninject('prepare.kill', ['k'])\nprint('survived k')")
    assert done.returncode == -signal.SIGKILL
    assert "survived j" in done.stdout and "survived k" not in done.stdout


def test_times_counts_firings_across_processes(tmp_path):
    spec = {"train.raise": {"keys": ["step3"], "times": 1, "state": str(tmp_path)}}
    code = ("from pipelines.faults import inject\n"
            "try:\n    inject('train.raise', ['step3'])\n    print('quiet')\nexcept RuntimeError:\n    print('fired')")
    outcomes = [_run(spec, code).stdout.strip() for _ in range(3)]
    assert outcomes == ["fired", "quiet", "quiet"]
    assert [p.name for p in tmp_path.iterdir()] == ["train.raise.0"]
