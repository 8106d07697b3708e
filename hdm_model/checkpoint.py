"""Our checkpoint format, written and read only through this module (the original release's formats live in
official.py and release.py).

A checkpoint is a directory:

    model.safetensors     the denoiser's weights, our key names (what sampling and --init-from load)
    ema.safetensors       their exponential moving average, float32, when the training stage kept one
    config.json           CheckpointMeta: the XUTConfig of the weights, the text encoder and VAE they were
                          trained with, and the training stage's config (credentials redacted)
    training_state.pt     optimizer, schedule, step, epoch and the latent keys trained in that epoch: only a
                          resumed training stage reads it, with torch.load(weights_only=True)
    sampling.json         optional SamplingDefaults: the CFG scale and unconditional TREAD rate sampling uses
                          when the caller names none (written by an evaluate job's guidance sweep)

`XUTDenoiser.save_pretrained` writes the first and third; a training stage the first four; an evaluate
job's guidance sweep adds sampling.json.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import XUTConfig

WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
META = "config.json"
TRAINING_STATE = "training_state.pt"
SAMPLING = "sampling.json"
SAMPLING_FILES = (META, WEIGHTS)  # what sampling and export need (not the optimizer) ...
SAMPLING_OPTIONAL = (EMA_WEIGHTS, SAMPLING)  # ... and use where present
DEFAULT_MAX_LENGTH = 256  # text tokens, where a checkpoint records no text encoder


@dataclass(frozen=True)
class CheckpointMeta:
    """config.json: {"model": XUTConfig, "text_encoder": {"id", "max_length"}, "vae": id, "stage": {...}}."""

    model: XUTConfig
    text_encoder: str | None = None  # hub id, local path or s3:// URI; None: the caller names one
    max_length: int = DEFAULT_MAX_LENGTH  # text tokens the weights were trained with
    vae: str | None = None  # the VAE of the latents the weights were trained on
    stage: dict[str, Any] = field(default_factory=dict)  # the training stage's config, for provenance only

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "text_encoder": {"id": self.text_encoder, "max_length": self.max_length},
                "vae": self.vae, "stage": self.stage}

    @classmethod
    def from_json(cls, data: Any, *, where: str = META) -> CheckpointMeta:
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise ValueError(f"{where} has no \"model\" section (the XUTConfig of the weights)")
        try:
            model = XUTConfig.from_dict(data["model"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: the \"model\" section is not an XUTConfig: {e}") from e
        text = data.get("text_encoder") or {}
        return cls(model=model, text_encoder=text.get("id"), max_length=int(text.get("max_length", DEFAULT_MAX_LENGTH)),
                   vae=data.get("vae") or None, stage=dict(data.get("stage") or {}))


@dataclass(frozen=True)
class SamplingDefaults:
    """sampling.json: {"cfg_scale", "uncond_tread_rate", "source"}, the guidance HDMPipeline uses when the caller
    passes none. uncond_tread_rate None or 0: the unconditional branch unrouted."""

    cfg_scale: float
    uncond_tread_rate: float | None
    source: str = ""  # how the values were chosen, e.g. "evaluate sweep: best adherence_color 0.92"

    def __post_init__(self) -> None:
        if not _is_number(self.cfg_scale) or not 0 < self.cfg_scale < math.inf:
            raise ValueError(f"cfg_scale must be a positive number, got {self.cfg_scale!r}")
        rate = self.uncond_tread_rate
        if rate is not None and not (_is_number(rate) and 0 <= rate < 1):
            raise ValueError(f"uncond_tread_rate must be null or in [0, 1), got {rate!r}")
        if not isinstance(self.source, str):
            raise ValueError(f"source must be a string, got {self.source!r}")

    def to_text(self) -> str:
        """The file's content (the one serialisation: a local write and an s3:// upload both use it)."""
        return json.dumps({"cfg_scale": self.cfg_scale, "uncond_tread_rate": self.uncond_tread_rate,
                           "source": self.source}, indent=2) + "\n"

    @classmethod
    def from_text(cls, text: str, *, where: str = SAMPLING) -> SamplingDefaults:
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            unknown = sorted(set(data) - {"cfg_scale", "uncond_tread_rate", "source"})
            if unknown:
                raise ValueError(f"unknown keys {unknown}")
            if "cfg_scale" not in data:
                raise ValueError("no cfg_scale")
            return cls(cfg_scale=data["cfg_scale"], uncond_tread_rate=data.get("uncond_tread_rate"),
                       source=data.get("source", ""))
        except ValueError as e:  # json.JSONDecodeError is one
            raise ValueError(f"{where} is not valid sampling defaults ({e}): delete it, or rewrite it as "
                             '{"cfg_scale": 3.0, "uncond_tread_rate": null, "source": ""}') from e


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def write_sampling_defaults(directory: str | os.PathLike, defaults: SamplingDefaults) -> Path:
    """Write sampling.json into a checkpoint directory, atomically (a temporary file, fsynced, then renamed: a
    reader sees the old file or the new one). The weights and config.json are not touched."""
    directory = Path(directory)
    if not is_checkpoint(directory):
        raise FileNotFoundError(f"{directory} is not a checkpoint directory (no {WEIGHTS} and {META}): sampling "
                                "defaults go beside a checkpoint's weights")
    path = directory / SAMPLING
    tmp = directory / f".{SAMPLING}.{os.getpid()}.tmp"
    tmp.write_text(defaults.to_text())
    _fsync(tmp)
    os.replace(tmp, path)
    return path


def read_sampling_defaults(directory: str | os.PathLike) -> SamplingDefaults | None:
    """The checkpoint's sampling.json, None where it has none; a file with bad content is refused (ValueError
    naming it)."""
    path = Path(directory) / SAMPLING
    if not path.is_file():
        return None
    return SamplingDefaults.from_text(path.read_text(errors="replace"), where=str(path))


def is_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds our checkpoint (as opposed to, say, a released file or folder)."""
    return (Path(directory) / WEIGHTS).is_file() and (Path(directory) / META).is_file()


def has_ema(directory: str | os.PathLike) -> bool:
    return (Path(directory) / EMA_WEIGHTS).is_file()


def save(directory: str | os.PathLike, *, weights: Mapping[str, Tensor], meta: CheckpointMeta,
         ema: Mapping[str, Tensor] | None = None, training_state: Mapping[str, Any] | None = None) -> Path:
    """Write a checkpoint: weights and meta always, the EMA and the training state when given.

    config.json goes last, each file flushed to disk before it: a directory reads as a checkpoint only once
    it holds config.json (`is_checkpoint`, `read_meta`), so a crash while writing never leaves one that loads
    but misses a file."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, directory / WEIGHTS)
    written = [WEIGHTS]
    if ema is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in ema.items()}, directory / EMA_WEIGHTS)
        written.append(EMA_WEIGHTS)
    if training_state is not None:
        torch.save(dict(training_state), directory / TRAINING_STATE)
        written.append(TRAINING_STATE)
    for name in written:
        _fsync(directory / name)
    (directory / META).write_text(json.dumps(meta.to_json(), indent=2))
    _fsync(directory / META)
    return directory


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_meta(directory: str | os.PathLike) -> CheckpointMeta:
    """The checkpoint's config.json, checked; a directory without the weights or the meta is refused."""
    directory = Path(directory)
    for name in SAMPLING_FILES:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a checkpoint directory: no {name}")
    return CheckpointMeta.from_json(json.loads((directory / META).read_text()), where=str(directory / META))


def load_weights(directory: str | os.PathLike, *, ema: bool = False, device: torch.device | str = "cpu"
                 ) -> dict[str, Tensor]:
    """The denoiser's weights; with `ema`, the EMA weights where the checkpoint has them."""
    from safetensors.torch import load_file

    directory = Path(directory)
    return load_file(directory / (EMA_WEIGHTS if ema and has_ema(directory) else WEIGHTS), device=str(device))


def load_ema(directory: str | os.PathLike, *, device: torch.device | str = "cpu") -> dict[str, Tensor] | None:
    """The EMA weights, None where the checkpoint has none."""
    from safetensors.torch import load_file

    return load_file(Path(directory) / EMA_WEIGHTS, device=str(device)) if has_ema(directory) else None


def load_training_state(directory: str | os.PathLike) -> dict[str, Any]:
    """What a resumed training stage restores (tensors and plain values only: weights_only=True)."""
    return torch.load(Path(directory) / TRAINING_STATE, map_location="cpu", weights_only=True)


def verify(directory: str | os.PathLike) -> CheckpointMeta:
    """The meta, after checking every tensor of the weights (and of the EMA, if any) against its XUTConfig:
    a file of another architecture is refused with the missing, unexpected and wrongly shaped keys named."""
    from safetensors import safe_open

    from .denoiser import XUTDenoiser

    directory = Path(directory)
    meta = read_meta(directory)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in XUTDenoiser(meta.model).state_dict().items()}
    for name in (WEIGHTS, EMA_WEIGHTS) if has_ema(directory) else (WEIGHTS,):
        with safe_open(directory / name, framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        check_state_keys(found, expected, what=f"{directory / name} (against the \"model\" of its {META})")
    return meta


def check_state_keys(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], *,
                     what: str) -> None:
    """Raise a ValueError naming every missing, unexpected or wrongly shaped tensor ({name: shape} maps)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} {found[k]} != {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    if missing or unexpected or wrong:
        parts = [f"{label}: {list_names(keys)}" for label, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if keys]
        raise ValueError(f"{what} does not match the architecture: " + "; ".join(parts))


def list_names(keys: list[str], limit: int = 12) -> str:
    """The first `limit` of `keys` and how many more: error messages that stay one line."""
    shown = ", ".join(sorted(keys)[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
