import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipelines.data.images import ImageError, TransformSpec, decode_image, resize_for_resolution, target_size
from pipelines.data.latent_store import ReasonCode

from tests.image_cases import MAX_PIXELS, cases

SPEC = TransformSpec(max_aspect=3.0)


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.name)
def test_every_case_gets_its_outcome(case):
    try:
        img = decode_image(case.data, max_pixels=MAX_PIXELS)
    except ImageError as e:
        assert set(case.expected.values()) == {e.code}
        return
    assert img.mode == "RGB"
    for res, reason in case.expected.items():
        if reason is not None:
            with pytest.raises(ImageError, match=reason):
                resize_for_resolution(img, res, SPEC)
            continue
        pixels = resize_for_resolution(img, res, SPEC)
        h, w, c = pixels.shape
        assert c == 3 and pixels.dtype == np.uint8
        assert min(h, w) == res and h % 16 == 0 and w % 16 == 0
        assert max(h, w) <= 3 * res


def test_sixteen_bit_png_is_scaled_not_clipped():
    img = decode_image(next(c for c in cases() if c.name == "deep16.png").data, max_pixels=MAX_PIXELS)
    arr = np.asarray(img)
    assert arr.min() <= 1 and arr.max() >= 254
    assert 100 < arr.mean() < 155  # a linear ramp over the full range, not a white image


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    img = decode_image(buf.getvalue(), max_pixels=MAX_PIXELS)
    assert img.getpixel((5, 5)) == (255, 255, 255)
    assert img.getpixel((0, 0)) == (255, 0, 0)


def test_exif_orientation_is_applied():
    img = decode_image(next(c for c in cases() if c.name == "rotated.jpg").data, max_pixels=MAX_PIXELS)
    assert img.size == (64, 96)


def test_animation_gives_its_first_frame():
    frames = [Image.new("RGB", (32, 32), (200, 10, 10)), Image.new("RGB", (32, 32), (10, 10, 200))]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    r, g, b = decode_image(buf.getvalue(), max_pixels=MAX_PIXELS).getpixel((16, 16))
    assert r > 150 and b < 60


@pytest.mark.parametrize("size, res, expected", [
    ((1000, 3000), 256, (256, 768, 256, 768)),  # exactly 3:1 fits
    ((1000, 4000), 256, (256, 1024, 256, 768)),  # 4:1 is centre-cropped to 3:1
    ((3000, 1000), 256, (768, 256, 768, 256)),
    ((1000, 1333), 256, (256, 341, 256, 336)),  # long side cut to a multiple of 16
    ((512, 512), 512, (512, 512, 512, 512)),
])
def test_target_size(size, res, expected):
    assert target_size(*size, res, SPEC) == expected


def test_too_small_names_the_sizes():
    with pytest.raises(ImageError, match="short side 100 px < 256"):
        target_size(100, 300, 256, SPEC)


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def test_formats_outside_the_list_are_refused_by_name():
    eps = _save(Image.new("RGB", (64, 64)), "EPS")  # an EPS named .jpg: Pillow would run Ghostscript on it
    with pytest.raises(ImageError) as info:
        decode_image(eps, max_pixels=MAX_PIXELS)
    assert info.value.code == ReasonCode.UNSUPPORTED_FORMAT and "EPS" in str(info.value)
    for fmt in ("ICO", "TGA", "PPM"):  # formats Pillow decodes, not in ALLOWED_FORMATS
        with pytest.raises(ImageError, match=ReasonCode.UNSUPPORTED_FORMAT + "|" + ReasonCode.NOT_AN_IMAGE):
            decode_image(_save(Image.new("RGB", (64, 64)), fmt), max_pixels=MAX_PIXELS)


def test_a_broken_header_of_an_allowed_format_is_corrupt_not_unsupported():
    with pytest.raises(ImageError) as info:
        decode_image(b"\xff\xd8\xff\x00" + bytes(40), max_pixels=MAX_PIXELS)
    assert info.value.code == ReasonCode.CORRUPT_IMAGE and "JPEG" in str(info.value)


def test_a_camera_multi_picture_jpeg_is_read():
    frames = [Image.new("RGB", (64, 48), (200, 20, 20)), Image.new("RGB", (64, 48), (20, 20, 200))]
    mpo = _save(frames[0], "MPO", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    r, _, b = decode_image(mpo, max_pixels=MAX_PIXELS).getpixel((10, 10))
    assert r > 150 and b < 60


def _png_header(width: int, height: int, bit_depth: int, color_type: int) -> bytes:
    """A PNG whose header claims a size its (empty) data never fills: what an upload says before decoding."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decode_memory_guard_refuses_before_decoding():
    # RGBA: 144 M px x 4 bytes = 549 MiB, under Pillow's own pixel limit and under max_pixels
    claim = _png_header(12000, 12000, 16, 6)
    with pytest.raises(ImageError) as info:
        decode_image(claim, max_pixels=1_000_000_000, max_bytes=512 << 20)
    assert info.value.code == ReasonCode.DECODE_MEMORY and "12000x12000 RGBA decodes to 549 MiB" in str(info.value)
    deep = next(c for c in cases() if c.name == "deep16.png").data  # 72 x 72, 2 bytes a pixel
    decode_image(deep, max_pixels=MAX_PIXELS, max_bytes=72 * 72 * 2)
    with pytest.raises(ImageError, match=ReasonCode.DECODE_MEMORY):
        decode_image(deep, max_pixels=MAX_PIXELS, max_bytes=72 * 72 * 2 - 1)


def _exif(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """A big-endian EXIF block: (tag, type, count, value or offset bytes) entries, ASCII data after the IFD."""
    ifd_end = 8 + 2 + 12 * len(entries) + 4
    body, extra = struct.pack(">H", len(entries)), b""
    for tag, typ, count, value in entries:
        if len(value) > 4:
            field, extra = struct.pack(">I", ifd_end + len(extra)), extra + value
        else:
            field = value.ljust(4, b"\0")
        body += struct.pack(">HHI", tag, typ, count) + field
    return b"Exif\0\0MM\0*" + struct.pack(">I", 8) + body + b"\0\0\0\0" + extra


def test_an_error_after_decode_is_transform_failed():
    # a rotated photo whose EXIF holds a PageNumber tag typed as text (as a damaged camera file can): Pillow
    # decodes it, then fails writing the EXIF back while applying the rotation
    exif = _exif([(0x0112, 3, 1, struct.pack(">H", 6)), (0x0129, 2, 5, b"desc\0")])
    data = _save(Image.new("RGB", (64, 48), (10, 200, 10)), "JPEG", exif=exif)
    with pytest.raises(ImageError) as info:
        decode_image(data, max_pixels=MAX_PIXELS)
    assert info.value.code == ReasonCode.TRANSFORM_FAILED and "error" in info.value.detail
