"""Decode, validate and resize one image (pure functions: the Ray stages call them per row).

Failures raise `ImageError` with a `ReasonCode`, which becomes the `reason_code` of an errors/ row.

What is decoded: the formats of ALLOWED_FORMATS only, whatever the file's name says (Pillow would otherwise
try every plugin it has, EPS through Ghostscript included). Bytes in another format Pillow knows (an EPS
saved as .jpg) are UNSUPPORTED_FORMAT, naming it; bytes no format claims are NOT_AN_IMAGE.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageMode, ImageOps

from pipelines.data.latent_store import ReasonCode, reason_text

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# Pillow's names for what those files hold; a JPEG with more than one picture (a camera's MPO) opens as JPEG
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
MAX_DECODE_BYTES = 2 << 30  # decoded first frame; max_pixels alone lets a 16-bit or many-band image through
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


def decode_image(data: bytes, *, max_pixels: int, max_bytes: int = MAX_DECODE_BYTES) -> Image.Image:
    """Bytes -> RGB image: EXIF orientation applied, alpha composited on white, first frame of animations,
    16-bit scaled to 8-bit. Raises ImageError for empty, non-image, unsupported, truncated or oversized input
    (pixels over `max_pixels`, decoded bytes over `max_bytes`, both known from the header before decoding),
    and TRANSFORM_FAILED for whatever fails after decoding."""
    if not data:
        raise ImageError(ReasonCode.EMPTY_FILE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            _check_size(img, max_pixels=max_pixels, max_bytes=max_bytes)  # header only: nothing decoded yet
            img.seek(0)
            img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(ReasonCode.DECOMPRESSION_BOMB, str(e)) from None
    except Image.UnidentifiedImageError:
        raise _unidentified(data) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(ReasonCode.CORRUPT_IMAGE, str(e)) from None
    try:  # a decoded image that cannot be used (e.g. EXIF that Pillow reads but cannot write back) is this
        # image's error, never the job's
        return to_rgb(ImageOps.exif_transpose(img))
    except Exception as e:  # noqa: BLE001
        raise ImageError(ReasonCode.TRANSFORM_FAILED, f"{type(e).__name__}: {e}") from None


def _check_size(img: Image.Image, *, max_pixels: int, max_bytes: int) -> None:
    if img.width * img.height > max_pixels:
        raise ImageError(ReasonCode.DECOMPRESSION_BOMB, f"{img.width}x{img.height} px > {max_pixels}")
    mode = ImageMode.getmode(img.mode)
    decoded = img.width * img.height * len(mode.bands) * int(mode.typestr[-1])  # typestr: "|u1", "<u2", "<f4"
    if decoded > max_bytes:
        raise ImageError(ReasonCode.DECODE_MEMORY, f"{img.width}x{img.height} {img.mode} decodes to "
                         f"{decoded / 2**20:.0f} MiB > {max_bytes / 2**20:.0f} MiB")


def _unidentified(data: bytes) -> ImageError:
    """Why Pillow, held to ALLOWED_FORMATS, opened nothing: another format, a broken header of ours, or no
    image at all."""
    found = identify(data)
    if found is None:
        return ImageError(ReasonCode.NOT_AN_IMAGE)
    if found in ALLOWED_FORMATS:
        return ImageError(ReasonCode.CORRUPT_IMAGE, f"{found} header unreadable")
    return ImageError(ReasonCode.UNSUPPORTED_FORMAT, f"{found} (decoded: {', '.join(ALLOWED_FORMATS)})")


def identify(data: bytes) -> str | None:
    """The name of the Pillow format whose signature `data` starts with, if any (signatures only: no plugin
    parses the file)."""
    Image.init()
    prefix = data[:16]
    return next((name for name, (_, accept) in Image.OPEN.items() if accept is not None and _accepts(accept, prefix)),
                None)


def _accepts(accept, prefix: bytes) -> bool:
    try:
        return bool(accept(prefix))
    except Exception:  # noqa: BLE001 - some signature checks unpack more bytes than a tiny file has
        return False


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
