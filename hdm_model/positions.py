"""Position maps: the centred axial grid, shifted square crop and camera control (hdm_spec 2.6.3, 8.1, 9).

A position map holds one (y, x) pair per cell, rows first (channel 0 = y). The long side of the whole
image spans [-1, 1], the short side [-s/l, s/l], and positions are cell centres. A crop keeps the
coordinates of the cells it keeps, so the model sees where in the whole image the crop came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def make_axial_pos(h: int, w: int, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> Tensor:
    """Centred cell-centre grid of an h x w image: (h*w, 2) with channel 0 = y, 1 = x."""
    aspect = w / h
    y_half = 1.0 / aspect if aspect > 1 else 1.0  # written as the original computes it, for bit parity
    x_half = aspect if aspect < 1 else 1.0
    ys = _centres(-y_half, y_half, h, dtype=dtype, device=device)
    xs = _centres(-x_half, x_half, w, dtype=dtype, device=device)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)  # (h, w, 2)
    return grid.reshape(h * w, 2)


def _centres(lo: float, hi: float, n: int, *, dtype: torch.dtype, device) -> Tensor:
    edges = torch.linspace(lo, hi, n + 1, dtype=dtype, device=device)
    return (edges[:-1] + edges[1:]) / 2


def resize_pos_map(pos_map: Tensor, *, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> Tensor:
    """Resize (B, h*w, 2) to (B, h'*w', 2) as the released model does when patchifying.

    Bilinear with antialias (not exact subsampling: border cells are pulled inwards); parity needs this op.
    """
    b = pos_map.shape[0]
    grid = pos_map.reshape(b, *src_hw, 2).permute(0, 3, 1, 2)  # (B, 2, h, w)
    grid = F.interpolate(grid, size=dst_hw, mode="bilinear", antialias=True, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(b, dst_hw[0] * dst_hw[1], 2)  # (B, h'*w', 2)


# ---------------------------------------------------------------------------------------------------
# Shifted square crop, done at training time on a stored whole-image latent (design.md, hdm_spec 8.1).

def square_crop_offset(h: int, w: int, *, generator: torch.Generator | None = None) -> tuple[int, int]:
    """Random (row, col) offset of the largest square window of an h x w grid.

    Every valid offset can be drawn, the last one included (the original's randint excluded it).
    """
    side = min(h, w)
    slack = max(h, w) - side
    shift = int(torch.randint(0, slack + 1, (1,), generator=generator)) if slack else 0
    return (shift, 0) if h > w else (0, shift)


def crop_latent(latent: Tensor, *, generator: torch.Generator | None = None,
                offset: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Shifted square crop of a whole-image latent (C, h, w).

    Returns the square crop (C, s, s) and the matching slice of the whole-image position map (s*s, 2),
    s = min(h, w). `offset` fixes the window (row, col); otherwise it is drawn from `generator`.
    """
    _, h, w = latent.shape
    side = min(h, w)
    top, left = offset if offset is not None else square_crop_offset(h, w, generator=generator)
    if not (0 <= top <= h - side and 0 <= left <= w - side):
        raise ValueError(f"crop offset {(top, left)} is outside a {h}x{w} latent for a {side}x{side} window")
    full = make_axial_pos(h, w, device=latent.device).reshape(h, w, 2)
    pos = full[top:top + side, left:left + side].reshape(side * side, 2)
    return latent[:, top:top + side, left:left + side], pos


# ---------------------------------------------------------------------------------------------------
# Camera control at inference (hdm_spec 9).

@dataclass(frozen=True)
class Camera:
    """Virtual camera over the position grid: shift first, then zoom (zoom > 1 zooms in).

    x_shift > 0 moves the camera right, y_shift > 0 moves it down; the effective shift is shift / zoom.
    """

    zoom: float = 1.0
    x_shift: float = 0.0
    y_shift: float = 0.0

    def __post_init__(self) -> None:
        if self.zoom <= 0:
            raise ValueError(f"zoom must be > 0, got {self.zoom}")

    def pos_map(self, h: int, w: int, *, device: torch.device | str | None = None) -> Tensor:
        """(h*w, 2) position map of an h x w latent seen through this camera."""
        pos = make_axial_pos(h, w, device=device)
        shift = torch.tensor([self.y_shift, self.x_shift], dtype=pos.dtype, device=pos.device)
        return (pos + shift) / self.zoom
