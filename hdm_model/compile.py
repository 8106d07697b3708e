"""torch.compile of the denoiser and the text encoder (issue 16): a runtime choice, not part of the model.

Modes:
  off: eager.
  blocks: every transformer Block compiled in place (regional compilation). Blocks share one graph per
      (kind, sequence length, batch, train/eval); compiling a block takes seconds where the whole network
      takes minutes. Activation checkpointing composes: "outer" and "full" wrap the compiled block in an eager
      torch.utils.checkpoint, "mlp" checkpoints inside the block, which compile traces without a graph break
      and turns into a recomputation in its backward graph.
  full: the whole forward after the TREAD draw (`XUTDenoiser.forward_core`): the draw uses a torch.Generator,
      which compile cannot trace, so `forward` draws the routing indices eagerly and hands them in as a tensor.

Shapes are static (dynamic=False): one graph per resolution, text length, batch and TREAD keep count K (K is
fixed by the resolution and the rate). Compilation happens at the first forward of each shape, and state_dict
keys are unchanged (no `_orig_mod.` prefix), so checkpoints are the same with and without compilation.
Call these BEFORE wrapping the model in DistributedDataParallel.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from .denoiser import XUTDenoiser
from .layers import Block

CompileMode = Literal["off", "blocks", "full"]
# Every block kind x sequence length x batch x train/eval is one cached graph of the shared Block code; torch's
# default limit of 8 graphs per code would silently send training back to eager once sampling grids add theirs.
RECOMPILE_LIMIT = 64


def resolve_compile(mode: str, device: torch.device | str) -> CompileMode:
    """The compile mode of a job's config for `device`: "auto" -> "blocks" on CUDA, "off" elsewhere (a CPU
    compile costs minutes and gains little); other modes are returned as they are."""
    if mode == "auto":
        return "blocks" if torch.device(device).type == "cuda" else "off"
    if mode not in get_args(CompileMode):
        raise ValueError(f"compile must be 'auto' or one of {get_args(CompileMode)}, got {mode!r}")
    return mode


def compile_denoiser(model: XUTDenoiser, mode: CompileMode, *, backend: str = "inductor") -> XUTDenoiser:
    """Compile `model` in place as `mode` says and return it (see the module docstring)."""
    if mode not in get_args(CompileMode):
        raise ValueError(f"compile mode must be one of {get_args(CompileMode)}, got {mode!r}")
    if mode == "off":
        return model
    _raise_recompile_limit()
    if mode == "blocks":
        for block in model.modules():
            if isinstance(block, Block):
                block.compile(dynamic=False, backend=backend)
    else:
        # An instance attribute shadows the method; `forward` calls it after the eager routing draw.
        model.forward_core = torch.compile(model.forward_core, dynamic=False, backend=backend)
    return model


def compile_text_encoder(encoder: nn.Module, mode: CompileMode, *, backend: str = "inductor") -> nn.Module:
    """Compile the text encoder's transformer (`encoder.model`) in place unless `mode` is "off"; its batch size
    varies (caption batches, sample grids), so shapes are left to torch's automatic dynamic."""
    if mode not in get_args(CompileMode):
        raise ValueError(f"compile mode must be one of {get_args(CompileMode)}, got {mode!r}")
    if mode != "off":
        _raise_recompile_limit()
        encoder.model.compile(backend=backend)
    return encoder


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
