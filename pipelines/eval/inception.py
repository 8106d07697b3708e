"""Inception-v3 up to its 2048-d average-pool features: the network FID is measured with.

Written here (torchvision is not a dependency) with torchvision's module names, so the two usual weight files
load with strict key checks:
- variant "torchvision": torchvision's `inception_v3_google-0cc3c7bd.pth` (ImageNet's 1000 classes; its
  auxiliary head `AuxLogits.*` plays no part in the features and is dropped on loading);
- variant "fid": pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, the TensorFlow graph FID was defined
  with (1008 classes). Its blocks differ in pooling: the average pools of Mixed_5*, Mixed_6b-e and Mixed_7b
  leave the padding out of the mean (TensorFlow's), and Mixed_7c's pool branch takes a max.
Both expect RGB in [-1, 1] at 299 x 299 (torchvision's `transform_input` maps ImageNet-normalised input to
exactly that), so `forward` takes [0, 1] images of any size, resizes them bilinearly and scales them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Variant = Literal["torchvision", "fid"]
CLASSES = {"torchvision": 1000, "fid": 1008}  # the fc layer's size in each weights file
SIZE = 299
FEATURES = 2048
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
AUX_PREFIX = "AuxLogits."  # torchvision's training-only head, in its weights file


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 0.001, as the TensorFlow original), ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def pool3(x: Tensor, kind: str) -> Tensor:
    """The 3x3, stride-1 pool in front of a block's `branch_pool`: "avg" counts the zero padding in the mean
    (torchvision), "avg_exclusive" does not (TensorFlow), "max" is pytorch-fid's Mixed_7c."""
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=kind == "avg")


class InceptionA(nn.Module):  # Mixed_5b-d, 35 x 35
    def __init__(self, cin: int, pool_features: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(pool3(x, self.pool))], 1)


class InceptionB(nn.Module):  # Mixed_6a: 35 -> 17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b-e, 17 x 17, factorised 7x7
    def __init__(self, cin: int, c7: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(pool3(x, self.pool))], 1)


class InceptionD(nn.Module):  # Mixed_7a: 17 -> 8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b-c, 8 x 8, expanded 1x3 / 3x1 outputs
    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pool3(x, self.pool))], 1)


class InceptionV3(nn.Module):
    """The trunk of torchvision's Inception3 (no auxiliary head); `forward` gives the (N, 2048) pool features."""

    def __init__(self, variant: Variant = "fid"):
        super().__init__()
        if variant not in CLASSES:
            raise ValueError(f"Inception variant must be one of {sorted(CLASSES)}, got {variant!r}")
        self.variant = variant
        avg = "avg_exclusive" if variant == "fid" else "avg"
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, avg)
        self.Mixed_5c = InceptionA(256, 64, avg)
        self.Mixed_5d = InceptionA(288, 64, avg)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128, avg)
        self.Mixed_6c = InceptionC(768, 160, avg)
        self.Mixed_6d = InceptionC(768, 160, avg)
        self.Mixed_6e = InceptionC(768, 192, avg)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, avg)
        self.Mixed_7c = InceptionE(2048, "max" if variant == "fid" else avg)
        self.fc = nn.Linear(FEATURES, CLASSES[variant])  # unused by the features; kept so weight files load strictly

    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) RGB in [0, 1] -> (N, 2048) average-pool features."""
        x = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False) * 2 - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)  # -> (N, 288, 35, 35), (N, 768, 17, 17), (N, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (N, 2048)


def load_inception(weights: str, *, variant: Variant = "fid", device: str | torch.device = "cpu") -> InceptionV3:
    """InceptionV3 with `weights`: a local .safetensors / .pth file, or a hub id ("owner/repo/file.pth", or
    "owner/repo" holding one weights file; HF_HUB_OFFLINE=1 reads the local hub cache). Keys are checked
    strictly against torchvision's layout (its AuxLogits.* dropped). `model.weights_digest`: the file's sha256."""
    path = weights_file(weights)
    state = read_state_dict(path)
    model = InceptionV3(variant)
    check_keys(model, state, source=weights)
    model.load_state_dict(state, strict=True)
    model.weights_digest = sha256(path)
    return model.to(device).eval()


def weights_file(weights: str) -> Path:
    """The local file of `weights` (a path, else a hub download); the error says what was tried."""
    local = Path(weights).expanduser()
    if local.is_file():
        return local
    parts = weights.strip("/").split("/")
    if local.exists() or len(parts) < 2 or weights.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no Inception weights file at {weights!r}: give a .pth / .safetensors file or a "
                                "hub id such as owner/repo/file.pth")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return Path(_hub_file(repo, filename))
    except Exception as error:
        offline = " (HF_HUB_OFFLINE is set: only the local hub cache was read)" if _offline() else ""
        raise FileNotFoundError(f"no Inception weights at {weights!r}: not a local file, and the hub repo {repo!r} "
                                f"({filename or 'its one weights file'}) failed{offline}: "
                                f"{str(error).splitlines()[0]}") from error


def _hub_file(repo: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download, snapshot_download

    if filename:
        return hf_hub_download(repo, filename)
    snapshot = Path(snapshot_download(repo, allow_patterns=[f"*{s}" for s in WEIGHT_SUFFIXES]))
    found = sorted(p for p in snapshot.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
    if len(found) != 1:
        raise ValueError(f"{len(found)} weights files in {repo} ({[p.name for p in found]}): name one, "
                         f"{repo}/<file>")
    return str(found[0])


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a .safetensors or torch file, less torchvision's auxiliary head."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if not k.startswith(AUX_PREFIX)}


def check_keys(model: InceptionV3, state: dict[str, Tensor], *, source: str) -> None:
    """Refuse a state dict that is not this variant's Inception-v3, naming the keys and shapes that differ."""
    expected = model.state_dict()
    for key in expected:  # files saved before PyTorch 0.4.1 (torchvision's own) have no batch counters
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.tensor(0)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{source} is not Inception-v3 weights in torchvision's layout: missing keys {_few(missing)}, "
                         f"unexpected keys {_few(unexpected)}")
    classes = state["fc.weight"].shape[0]
    other = next((v for v, n in CLASSES.items() if n == classes and v != model.variant), None)
    if other:
        raise ValueError(f"{source} has {classes} classes, the {other!r} variant's weights: use variant={other!r}")
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if state[k].shape != v.shape]
    if shapes:
        raise ValueError(f"{source} has Inception-v3's keys with other shapes: {_few(shapes)}")


def _few(items: list[str], n: int = 5) -> str:
    return "none" if not items else ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
