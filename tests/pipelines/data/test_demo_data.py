"""pipelines/data/demo_data.py and the adherence detector on ground truth: generated images, noise, wrong captions."""

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.eval.adherence import detect, score
from pipelines.data.demo_data import BACKGROUNDS, COLORS, SHAPES, Scene, all_scenes, render, split_scenes, write_demo_data

from tests.pipelines.helpers import ROOT


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, write_demo_data(out, count=300, size=64, seed=3, holdout=2)


def test_writes_images_captions_url_list_and_heldout_prompts(demo):
    out, summary = demo
    table = pq.read_table(summary.urls).to_pylist()
    assert len(table) == summary.images == 300
    for row in table[:20]:
        path = row["url"].removeprefix("file://")
        assert row["url"].startswith("file:///") and Image.open(path).size == (64, 64)
        assert open(path[:-4] + ".txt").read() == row["caption"]
    heldout = [Scene.from_caption(line) for line in summary.heldout.read_text().splitlines()]
    assert len(heldout) == 2 * len(COLORS) == summary.heldout_scenes
    trained = {Scene.from_caption(row["caption"]) for row in table}
    assert not trained & set(heldout)  # held-out combinations never appear in training
    for words, field in ((COLORS, "color"), (SHAPES, "shape"), (BACKGROUNDS, "background")):
        assert {getattr(s, field) for s in trained} == set(words)  # yet every word does


def test_same_seed_same_bytes(demo, tmp_path):
    out, _ = demo
    write_demo_data(tmp_path, count=5, size=64, seed=3, holdout=2)
    for i in range(5):
        assert (tmp_path / f"images/{i:06d}.png").read_bytes() == (out / f"images/{i:06d}.png").read_bytes()
    assert (tmp_path / "heldout.txt").read_text() == (out / "heldout.txt").read_text()


def test_spread_sets_how_far_from_the_centre_a_shape_sits():
    def offsets(spread):  # the shape's bounding-box centre minus the image's, px, over 60 images
        rng = np.random.default_rng(0)
        out = []
        for scene in all_scenes()[:60]:
            mask = np.abs(np.asarray(render(scene, 64, rng, spread), np.int16)
                          - np.asarray(BACKGROUNDS[scene.background])).max(-1) > 60
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            out.append(max(abs((rows[0] + rows[-1]) / 2 - 31.5), abs((cols[0] + cols[-1]) / 2 - 31.5)))
        return np.array(out)

    assert offsets(0.0).max() <= 1.0
    assert offsets(0.3).max() <= 0.3 * (64 - 4 - 32) / 2 + 1 < offsets(1.0).max()
    with pytest.raises(ValueError, match="spread"):
        write_demo_data(".", count=1, spread=1.5)


def test_split_and_captions_refuse_what_they_cannot_honour():
    train, held = split_scenes(0, seed=0)
    assert held == [] and train == all_scenes()
    with pytest.raises(ValueError, match="holdout"):
        split_scenes(len(SHAPES) * len(BACKGROUNDS), seed=0)
    with pytest.raises(ValueError, match="not a demo caption"):
        Scene.from_caption("a pink circle on a white background")


def test_detector_is_right_on_clean_images(demo):
    out, summary = demo
    rows = pq.read_table(summary.urls).to_pylist()
    images = [Image.open(row["url"].removeprefix("file://")) for row in rows]
    result, _ = score(images, [row["caption"] for row in rows])
    assert result.color == 1.0 and result.shape >= 0.98


def test_detector_is_right_at_every_size_and_on_blurred_edges():
    rng = np.random.default_rng(0)
    scenes = all_scenes()
    images = [render(s, size, rng) for size in (32, 48, 64, 128) for s in scenes]
    blurred = [np.asarray(im.resize((im.width // 2,) * 2, Image.BILINEAR).resize(im.size, Image.BILINEAR))
               for im in images]
    prompts = [s.caption for _ in range(4) for s in scenes]
    assert score(images, prompts)[0].color == 1.0
    assert score(blurred, prompts)[0].color == 1.0


def test_detector_is_at_chance_without_adherence():
    """Noise images find no shape; real shapes scored against shuffled captions score about 1 / colors."""
    rng = np.random.default_rng(1)
    prompts = [s.caption for s in all_scenes()]
    noise = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in prompts]
    noise_score, _ = score(noise, prompts)
    assert noise_score.color <= 0.3
    scenes = [all_scenes()[i] for i in rng.integers(0, len(all_scenes()), 600)]
    images = [render(s, 32, rng) for s in scenes]
    shuffled = [scenes[i].caption for i in rng.permutation(len(scenes))]
    result, _ = score(images, shuffled)
    assert abs(result.color - result.chance_color) < 0.06 and abs(result.shape - result.chance_shape) < 0.08


def test_empty_or_grey_image_detects_nothing():
    flat = np.full((64, 64, 3), 128, np.uint8)
    grey_square = flat.copy()
    grey_square[20:40, 20:40] = 240
    assert detect(flat).color is None and detect(flat).shape is None
    assert detect(grey_square).color is None and detect(grey_square).shape == "square"


def test_command(tmp_path):
    result = subprocess.run([sys.executable, "jobs/make_demo_data.py", "--out", str(tmp_path), "--count", "4",
                             "--size", "32"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "4 images" in result.stdout and len(list((tmp_path / "images").glob("*.png"))) == 4
    refused = subprocess.run([sys.executable, "jobs/make_demo_data.py", "--out", str(tmp_path), "--holdout", "9"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 3 and "holdout" in refused.stderr  # refused by the job (pipelines/cli.py)
