import io

import numpy as np
import pytest
from PIL import Image

from pipelines.data.images import ImageError, TransformSpec, decode_image, resize_for_resolution, target_size

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
