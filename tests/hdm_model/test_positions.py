import pytest
import torch

from hdm_model import Camera, crop_latent, make_axial_pos
from hdm_model.positions import square_crop_offset


@pytest.mark.parametrize("h, w", [(12, 8), (8, 12), (8, 8)])
def test_crop_position_slice_equals_slice_of_full_grid(h, w):
    latent = torch.arange(4 * h * w, dtype=torch.float32).reshape(4, h, w)
    full = make_axial_pos(h, w).reshape(h, w, 2)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(40):
        crop, pos = crop_latent(latent, generator=gen)
        side = min(h, w)
        assert crop.shape == (4, side, side) and pos.shape == (side * side, 2)
        top, left = divmod(int(crop[0, 0, 0].item()), w)  # the crop's first cell tells its offset
        torch.testing.assert_close(crop, latent[:, top:top + side, left:left + side])
        torch.testing.assert_close(pos, full[top:top + side, left:left + side].reshape(-1, 2))
        seen.add((top, left))
    assert len(seen) == abs(h - w) + 1  # every offset is drawn, the last one included


def test_portrait_crop_spans_two_thirds_of_the_long_axis():
    """hdm_spec 8.1: a square crop of a 2:3 portrait has x in [-2/3, 2/3], y within [c - 2/3, c + 2/3]."""
    for top, centre in ((0, -1 / 3), (2, 0.0), (4, 1 / 3)):
        _, pos = crop_latent(torch.zeros(4, 12, 8), offset=(top, 0))
        assert pos[:, 1].min().item() == pytest.approx(-2 / 3 + 1 / 12)
        assert pos[:, 0].max().item() - pos[:, 0].min().item() == pytest.approx(4 / 3 - 1 / 6)
        assert pos[:, 0].mean().item() == pytest.approx(centre, abs=1e-6)


def test_crop_rejects_an_offset_outside_the_latent():
    with pytest.raises(ValueError, match="outside"):
        crop_latent(torch.zeros(4, 12, 8), offset=(5, 0))


def test_square_crop_offset_of_square_is_zero():
    assert square_crop_offset(8, 8) == (0, 0)


def test_camera_shift_then_zoom():
    base = make_axial_pos(4, 6)
    pos = Camera(zoom=2.0, x_shift=0.5, y_shift=-0.25).pos_map(4, 6)
    torch.testing.assert_close(pos[:, 0], (base[:, 0] - 0.25) / 2)
    torch.testing.assert_close(pos[:, 1], (base[:, 1] + 0.5) / 2)
    torch.testing.assert_close(Camera().pos_map(4, 6), base)
    with pytest.raises(ValueError):
        Camera(zoom=0)
