"""Built-in demo data: captioned synthetic images of colored shapes, ingested by img2dataset like real data.

Each image is one shape (circle, square, triangle) of one color at a random size and a random position near
the centre (`spread`) on a plain background, captioned "a red circle on a white background". Shape colors are
saturated and 60 degrees of hue apart; backgrounds are achromatic, so a shape's color never looks like a background
(`pipelines.eval.detector` relies on it). Some (color, shape, background) combinations never appear in the
training images: their captions are the held-out prompts that test whether the model composes words it
learned separately. Pure numpy + PIL, deterministic for a seed.

    DIR/images/NNNNNN.png   the images (lossless), with NNNNNN.txt captions beside them (a folder input)
    DIR/urls.parquet        url (file://) + caption: img2dataset's input
    DIR/heldout.txt         one held-out prompt per line (a --prompt-file for sampling and evaluation)
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from pipelines.config import StrictModel

# Saturated colors 60 degrees of hue apart (red 0, yellow 55, green 125, cyan 185, blue 230, purple 285).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "yellow": (235, 205, 20), "green": (30, 170, 50),
    "cyan": (20, 200, 210), "blue": (30, 60, 220), "purple": (160, 40, 210),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
JITTER = 12  # +- per channel on every color, so an image's exact colors vary
SIDE = (0.5, 0.7)  # a shape's side as a share of the image's, drawn uniformly
# The share of the free room around a shape that its position may use: 0 centred, 1 anywhere inside the image.
# Near the centre the demo's tiny model starts drawing outlines within minutes (probes on the demo VAE's
# latents at 64 px: sides 0.5-0.7 at spread 0.3 drew recognisable triangles and squares after 1200 steps,
# circles still lumpy; sides 0.4-0.7 anywhere drew blobs after 800).
SPREAD = 0.3
CAPTION = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"

    @classmethod
    def from_caption(cls, caption: str) -> Scene:
        """The scene a demo caption describes; ValueError for any other text."""
        match = CAPTION.match(caption.strip())
        if not match or match[1] not in COLORS or match[2] not in SHAPES or match[3] not in BACKGROUNDS:
            raise ValueError(f"not a demo caption: {caption!r} (expected 'a COLOR SHAPE on a BACKGROUND background')")
        return cls(*match.groups())


def all_scenes() -> list[Scene]:
    return [Scene(c, s, b) for c, s, b in itertools.product(COLORS, SHAPES, BACKGROUNDS)]


def split_scenes(holdout: int, seed: int) -> tuple[list[Scene], list[Scene]]:
    """(training, held-out) scenes: `holdout` random (shape, background) pairs per color are held out, so
    every color is tested equally and every word still appears in training."""
    pairs = list(itertools.product(SHAPES, BACKGROUNDS))
    if not 0 <= holdout < len(pairs):
        raise ValueError(f"holdout must be in [0, {len(pairs) - 1}] combinations per color, got {holdout}")
    rng = np.random.default_rng(seed)
    held = [Scene(c, *pairs[i]) for c in COLORS for i in sorted(rng.choice(len(pairs), holdout, replace=False))]
    train = [s for s in all_scenes() if s not in held]
    return train, held


def render(scene: Scene, size: int, rng: np.random.Generator, spread: float = SPREAD):
    """One PIL image of `scene`: the shape's side is a SIDE share of the image's, fully inside it, its box
    offset from the centre by at most `spread` / 2 of the room left around it on each axis."""
    from PIL import Image, ImageDraw

    def jittered(rgb: tuple[int, int, int]) -> tuple[int, ...]:
        return tuple(int(v) for v in np.clip(np.array(rgb) + rng.integers(-JITTER, JITTER + 1, 3), 0, 255))

    image = Image.new("RGB", (size, size), jittered(BACKGROUNDS[scene.background]))
    side = int(rng.integers(int(SIDE[0] * size), int(SIDE[1] * size) + 1))
    margin = max(2, size // 32)
    room = size - 2 * margin - side
    left, top = (margin + int(round(room / 2 + (u - 0.5) * spread * room)) for u in rng.random(2))
    box = (left, top, left + side - 1, top + side - 1)
    draw, fill = ImageDraw.Draw(image), jittered(COLORS[scene.color])
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # upright isosceles triangle filling its box: half the box's area
        draw.polygon([(left + side / 2, top), (left, top + side - 1), (left + side - 1, top + side - 1)], fill=fill)
    return image


@dataclass
class DemoData:
    images: int
    urls: Path
    heldout: Path
    train_scenes: int
    heldout_scenes: int

    def format(self) -> str:
        return (f"demo data: {self.images} images of {self.train_scenes} scenes -> {self.urls}\n"
                f"  {self.heldout_scenes} held-out prompts -> {self.heldout}")


def write_demo_data(out: str | Path, *, count: int = 2000, size: int = 64, seed: int = 0,
                    holdout: int = 1, spread: float = SPREAD) -> DemoData:
    """Write `count` images of `size` px (scenes drawn uniformly from the training split), their captions,
    the URL list and the held-out prompts under `out`. The same arguments give the same bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if count < 1 or size < 16 or not 0 <= spread <= 1:
        raise ValueError(f"need count >= 1, size >= 16 px and spread in [0, 1], got count={count}, size={size}, "
                         f"spread={spread}")
    out = Path(out).resolve()
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    train, held = split_scenes(holdout, seed)
    rng = np.random.default_rng(seed)
    urls, captions = [], []
    for i in range(count):
        scene = train[int(rng.integers(len(train)))]
        path = images / f"{i:06d}.png"
        render(scene, size, rng, spread).save(path, format="PNG")
        path.with_suffix(".txt").write_text(scene.caption)
        urls.append(path.as_uri())
        captions.append(scene.caption)
    pq.write_table(pa.table({"url": urls, "caption": captions}), out / "urls.parquet")
    (out / "heldout.txt").write_text("".join(f"{s.caption}\n" for s in held))
    return DemoData(images=count, urls=out / "urls.parquet", heldout=out / "heldout.txt",
                    train_scenes=len(train), heldout_scenes=len(held))


class DemoDataConfig(StrictModel):
    """jobs/make_demo_data.py (the demo pipeline's first stage)."""

    out: str  # local directory (the URL list holds file:// URLs into it)
    count: int = Field(2000, ge=1)
    size: int = Field(64, ge=16)  # image side, px
    seed: int = 0
    holdout: int = Field(1, ge=0)  # (shape, background) combinations held out of training per color
    spread: float = Field(SPREAD, ge=0, le=1)  # position: 0 centred, 1 anywhere in the image
