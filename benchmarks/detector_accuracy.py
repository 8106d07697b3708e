"""The demo detector's accuracy, old rule (foreground bounding-box fill, kept below for the comparison) vs
`pipelines.eval.detector`, per condition: clean demo images (every colour x shape x background), the same
blurred, haloed, on a tinted background, noisy (tests/pipelines/eval/detector_cases.py), reconstructed by a
trained demo VAE, and the generated images of an evaluate folder scored against their prompts.

    .venv/bin/python benchmarks/detector_accuracy.py                                  # ~1 min on 2 cores
    .venv/bin/python benchmarks/detector_accuracy.py --vae runs/demo/vae/ID --eval runs/demo/eval-64/ID
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.data.demo_data import Scene  # noqa: E402
from pipelines.eval.detector import detect, nearest_color  # noqa: E402
from tests.pipelines.eval.detector_cases import PERTURBATIONS, clean_cases, perturbed, reconstructed  # noqa: E402


def old_detect(pixels: np.ndarray) -> tuple[str | None, str | None]:
    """The rule before issue 18: foreground = farther than 60 from the border median; shape from the share of
    the foreground's axis-aligned bounding box it fills."""
    pixels = pixels.astype(np.float64)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    mask = np.linalg.norm(pixels - np.median(border, axis=0), axis=-1) > 60.0
    if mask.mean() < 0.01:
        return None, None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    fill = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].mean()
    shape = next(name for cut, name in ((0.64, "triangle"), (0.89, "circle"), (1.01, "square")) if fill < cut)
    return nearest_color(np.median(pixels[mask], axis=0)), shape


def accuracies(cases) -> tuple[float, float, float, float]:
    """(old colour, old shape, new colour, new shape) accuracy."""
    old = [old_detect(image) for image, _ in cases]
    new = [detect(image) for image, _ in cases]
    scenes = [scene for _, scene in cases]
    return (np.mean([o[0] == s.color for o, s in zip(old, scenes)]),
            np.mean([o[1] == s.shape for o, s in zip(old, scenes)]),
            np.mean([n.color == s.color for n, s in zip(new, scenes)]),
            np.mean([n.shape == s.shape for n, s in zip(new, scenes)]))


def eval_cases(folder: Path):
    """An evaluate folder's images with their prompts' scenes (evaluation.json, or adherence.json before)."""
    from PIL import Image

    results = next(folder / name for name in ("evaluation.json", "adherence.json") if (folder / name).exists())
    rows = json.loads(results.read_text())["images"]
    # rows name their file (`image`); evaluation.json before 2026-12-05 did not: its rows follow the files' order
    files = [row["image"] for row in rows] if "image" in rows[0] else sorted(p.name for p in folder.glob("[0-9]*.png"))
    return [(np.asarray(Image.open(folder / name).convert("RGB")), Scene.from_caption(row["prompt"]))
            for name, row in zip(files, rows, strict=True)]


def newest(pattern: str) -> str | None:
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    return found[-1] if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", default=newest("runs/demo/vae/*/"), help="a demo VAE folder (diffusers)")
    parser.add_argument("--eval", nargs="*", default=[p for p in (newest("runs/demo/eval-64/*/"),
                                                                  newest("runs/demo/eval-32/*/")) if p],
                        help="evaluate folders of generated images")
    parser.add_argument("--per-scene", type=int, default=4, help="images per colour x shape x background")
    args = parser.parse_args()
    print(f"{'condition':<22} {'images':>6}  {'old colour':>10} {'old shape':>9}  {'new colour':>10} {'new shape':>9}")

    def line(name, cases):
        oc, os_, nc, ns = accuracies(cases)
        print(f"{name:<22} {len(cases):>6}  {oc:>10.3f} {os_:>9.3f}  {nc:>10.3f} {ns:>9.3f}", flush=True)

    vae = None
    if args.vae:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae).eval()
    for size in (64, 32):
        clean = clean_cases(size=size, per_scene=args.per_scene, seed=10)
        line(f"clean {size} px", clean)
        if vae is not None:
            line(f"VAE recon {size} px", reconstructed(vae, clean))
        for name in PERTURBATIONS:
            line(f"{name} {size} px", perturbed(clean, name, seed=11))
    for folder in args.eval:
        line(f"generated {Path(folder).parent.name}", eval_cases(Path(folder)))
    print(f"VAE: {args.vae}; generated: {', '.join(args.eval) or 'none'}")


if __name__ == "__main__":
    main()
