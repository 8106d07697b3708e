"""Every odd and bad input the precompute job must handle, generated on the fly.

`expected` maps each case to the error reason code it must produce (None: it must encode), per
resolution when the outcome depends on it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SMALL, LARGE = 32, 64  # the two resolutions the tests request
MAX_PIXELS = 1_000_000  # the tests' decompression-bomb limit


@dataclass(frozen=True)
class Case:
    name: str  # file name in a folder input (its key)
    data: bytes
    caption: str | None
    expected: dict[int, str | None]  # res -> error reason code, None = a latent row


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _gradient(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), rng.integers(0, 255, (h, w))], -1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def _exif_rotated_jpeg() -> bytes:
    img = _gradient(96, 64, 7)  # stored landscape; orientation 6 shows it as a 64 x 96 portrait
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(img, "JPEG", exif=exif.tobytes())


def _animated(fmt: str) -> bytes:
    frames = [_gradient(80, 64, 1), _gradient(80, 64, 2).transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    if fmt == "GIF":
        frames = [f.convert("P") for f in frames]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _png16() -> bytes:
    arr = (np.linspace(0, 65535, 72 * 72).reshape(72, 72)).astype(np.uint16)
    return _save(Image.fromarray(arr), "PNG")  # mode I;16


def _palette_with_transparency() -> bytes:
    img = _gradient(64, 80, 3).convert("P")
    return _save(img, "PNG", transparency=0)


def _bomb() -> bytes:
    return _save(Image.new("L", (1500, 1000), 0), "PNG")  # 1.5 Mpx > MAX_PIXELS, a few kB on disk


def cases() -> list[Case]:
    ok = {SMALL: None, LARGE: None}
    everywhere = lambda reason: {SMALL: reason, LARGE: reason}  # noqa: E731
    rgba = _gradient(80, 80, 4).convert("RGBA")
    rgba.putalpha(128)
    jpeg = _save(_gradient(96, 80, 5), "JPEG", quality=90)
    return [
        Case("rgb.jpg", jpeg, "a gradient, jpeg", ok),
        Case("rgba.png", _save(rgba, "PNG"), "half transparent", ok),
        Case("gray.png", _save(_gradient(64, 96, 6).convert("L"), "PNG"), None, ok),
        Case("palette.png", _save(_gradient(64, 64, 8).convert("P"), "PNG"), None, ok),
        Case("palette_alpha.png", _palette_with_transparency(), None, ok),
        Case("cmyk.jpg", _save(_gradient(70, 90, 9).convert("CMYK"), "JPEG"), "cmyk", ok),
        Case("deep16.png", _png16(), None, ok),
        Case("animated.gif", _animated("GIF"), None, ok),
        Case("animated.webp", _animated("WEBP"), None, ok),
        Case("rotated.jpg", _exif_rotated_jpeg(), "exif rotated", ok),
        Case("panorama.png", _save(_gradient(512, 64, 10), "PNG"), "very wide", ok),
        Case("nested/deep.jpg", _save(_gradient(64, 64, 11), "JPEG"), "in a subfolder", ok),
        Case("small.png", _save(_gradient(40, 48, 12), "PNG"), None, {SMALL: None, LARGE: "too_small"}),
        Case("empty.jpg", b"", None, everywhere("empty_file")),
        Case("truncated.jpg", jpeg[: len(jpeg) // 2], None, everywhere("corrupt_image")),
        Case("not_an_image.jpg", b"this is plain text, not a jpeg\n" * 10, None, everywhere("not_an_image")),
        Case("bomb.png", _bomb(), None, everywhere("decompression_bomb")),
    ]


def write_folder(directory: Path, selected: list[Case] | None = None) -> list[Case]:
    """A folder input: each case as a file, captions as sidecar .txt files."""
    selected = cases() if selected is None else selected
    for case in selected:
        path = directory / case.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(case.data)
        if case.caption is not None:
            path.with_suffix(".txt").write_text(case.caption)
    return selected


def smooth_images(directory: Path, n: int, *, seed: int = 0, sizes=(48, 64, 80)) -> list[Path]:
    """n smooth, colourful images (gradients and soft blobs) a small VAE can learn to reconstruct."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = (int(rng.choice(sizes)) for _ in range(2))
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        channels = []
        for _ in range(3):
            cy, cx, r = rng.uniform(0, 1, 3) * (1, 1, 0.5) + (0, 0, 0.2)
            blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r**2))
            ramp = rng.uniform(-1, 1) * x + rng.uniform(-1, 1) * y
            channels.append(0.5 + 0.35 * blob - 0.25 + 0.25 * ramp)
        arr = (np.clip(np.stack(channels, -1), 0, 1) * 255).astype(np.uint8)
        path = directory / f"smooth_{i:03d}.png"
        Image.fromarray(arr, "RGB").save(path)
        paths.append(path)
    return paths
