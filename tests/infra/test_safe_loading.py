"""Checkpoints never unpickle arbitrary objects: every `torch.load` in the code passes weights_only=True,
and model weights (ours and the released HDM file) are read with safetensors."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("hdm_model", "pipelines", "jobs", "benchmarks", "infra")


def calls(name: str) -> list[tuple[Path, ast.Call]]:
    """Every call of `module.attr` (e.g. "torch.load") in the project's Python sources."""
    module, attr = name.split(".")
    found = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == module):
                    found.append((path, node))
    return found


def test_every_torch_load_is_weights_only():
    loads = calls("torch.load")
    assert loads  # the training state is loaded somewhere: the check sees it
    for path, call in loads:
        flags = {k.arg: k.value for k in call.keywords}
        assert isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True, \
            f"{path.relative_to(ROOT)}:{call.lineno}: torch.load without weights_only=True"


def test_no_pickle_loading():
    assert not calls("pickle.load") and not calls("pickle.loads")


def test_model_weights_load_through_safetensors():
    for path in ("hdm_model/checkpoint.py", "hdm_model/official.py"):  # our checkpoints; the release's files
        text = (ROOT / path).read_text()
        assert "from safetensors.torch import load_file" in text, path
