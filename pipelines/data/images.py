"""Decode, validate and resize one image (pure functions: the Ray stages call them per row).

Failures raise `ImageError` with a `ReasonCode`, which becomes the `reason_code` of an errors/ row.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from pipelines.data.latent_store import ReasonCode, reason_text

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
SIZE_MULTIPLE = 16  # pixels: 8 (VAE) x 2 (patch), so every latent side is even


class ImageError(ValueError):
    """An input that cannot become a training image; `code` is a ReasonCode, `detail` free text."""

    def __init__(self, code: str, detail: str = ""):
        super().__init__(reason_text(code, detail))
        self.code, self.detail = code, detail


@dataclass(frozen=True)
class TransformSpec:
    """Everything that decides the pixels fed to the VAE; stored in the manifest and checked on resume."""

    max_aspect: float
    filter: str = "bicubic"
    multiple: int = SIZE_MULTIPLE
    alpha_background: str = "white"

    def to_dict(self) -> dict:
        return {"resize": "short_side", "crop": "center", "max_aspect": self.max_aspect, "filter": self.filter,
                "multiple": self.multiple, "alpha_background": self.alpha_background}


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Bytes -> RGB image: EXIF orientation applied, alpha composited on white, first frame of animations,
    16-bit scaled to 8-bit. Raises ImageError for empty, non-image, truncated or oversized input."""
    if not data:
        raise ImageError(ReasonCode.EMPTY_FILE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:  # header only: nothing decoded yet
                raise ImageError(ReasonCode.DECOMPRESSION_BOMB, f"{img.width}x{img.height} px > {max_pixels}")
            img.seek(0)
            img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(ReasonCode.DECOMPRESSION_BOMB, str(e)) from None
    except Image.UnidentifiedImageError:
        raise ImageError(ReasonCode.NOT_AN_IMAGE) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(ReasonCode.CORRUPT_IMAGE, str(e)) from None
    img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def target_size(width: int, height: int, res: int, spec: TransformSpec) -> tuple[int, int, int, int]:
    """(resized_w, resized_h, crop_w, crop_h) for short side = res; the long side is capped at
    res * max_aspect and cut down to a multiple of `spec.multiple` by a centre crop."""
    short, long = min(width, height), max(width, height)
    if short < res:
        raise ImageError(ReasonCode.TOO_SMALL, f"short side {short} px < {res}")
    long_resized = math.floor(res * long / short)  # torchvision Resize(int) rounds the long side down
    long_kept = min(long_resized, math.floor(res * spec.max_aspect))
    long_kept -= long_kept % spec.multiple
    if width <= height:
        return res, long_resized, res, long_kept
    return long_resized, res, long_kept, res


def resize_for_resolution(img: Image.Image, res: int, spec: TransformSpec) -> np.ndarray:
    """RGB image -> (H, W, 3) uint8 with short side = res and both sides multiples of spec.multiple."""
    rw, rh, cw, ch = target_size(img.width, img.height, res, spec)
    resized = img.resize((rw, rh), Image.Resampling.BICUBIC)
    left, top = (rw - cw) // 2, (rh - ch) // 2
    return np.asarray(resized.crop((left, top, left + cw, top + ch)))


def thumbnail(img: Image.Image, side: int = 384) -> bytes:
    """A small PNG of the image for captioning (so captioners never receive full-size pixels)."""
    small = img.copy()
    small.thumbnail((side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, format="PNG")
    return buf.getvalue()
