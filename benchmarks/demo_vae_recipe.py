"""Draws of the demo VAE's recipe (demo.toml's `vae` stage) outside Ray: how alike independent runs are.

Each draw renders the demo's training images with its own seed, trains the VAE in this process with the job's
own pieces (pipelines.train.eqvae.training_images: crops, every Nth step whole images;
hdm_model.eqvae.eq_vae_loss, AdamW, clipping, the EMA of pipelines.train.step), then prints held-out PSNR
(16 centre 32 px crops, as the job measures it) and how often the demo detector reads the right colour and
shape on reconstructions of every colour x shape x background at 64 and 32 px, for the last weights and for
their moving average. One thread per draw; two draws at a time.

    .venv/bin/python benchmarks/demo_vae_recipe.py --seeds 0 1 2 3                # ~3-4 min per pair on 2 cores
    .venv/bin/python benchmarks/demo_vae_recipe.py --seeds 0 1 --whole-image-every 0      # crops only
    .venv/bin/python benchmarks/demo_vae_recipe.py --seeds 0 1 --lr 3e-3 --steps 1750     # an older recipe
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = tomllib.loads((ROOT / "pipelines/dag/configs/demo.toml").read_text())["stages"]["vae"]["params"]


def draw(seed: int, args: argparse.Namespace) -> dict:
    import torch

    from hdm_model.eqvae import EQConfig, build_vae, eq_vae_loss, psnr, reconstruct
    from pipelines.data.demo_data import render, split_scenes
    from pipelines.train.config import VAETrainConfig
    from pipelines.train.eqvae import to_images, training_images
    from pipelines.train.step import EMA
    from tests.pipelines.eval.detector_cases import clean_cases, reconstructed
    from tests.pipelines.eval.test_detector import accuracy

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    train_scenes, _ = split_scenes(1, 0)
    images = [np.asarray(render(train_scenes[rng.integers(len(train_scenes))], 64, rng)) for _ in range(2000)]

    def rows(batch):
        return {"pixels": [i.tobytes() for i in batch], "h": [64] * len(batch), "w": [64] * len(batch)}

    cfg = VAETrainConfig(input="unused", output="unused", crop_size=args.crop_size,
                         image_size=RECIPE["image_size"],
                         min_scale=RECIPE["min_scale"], batch_size=args.batch_size,
                         whole_image_every=args.whole_image_every)
    held_out, train = to_images(rows(images[:16]), args.crop_size, None), images[16:]
    torch.manual_seed(seed)
    vae = build_vae(RECIPE["vae"], norm_num_groups=args.norm_groups)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    ema = EMA(vae, args.ema_decay)
    objective = EQConfig(p_eq=RECIPE["p_eq"], pixel_loss=RECIPE["pixel_loss"])
    gen, order = torch.Generator().manual_seed(seed), []
    for step in range(1, args.steps + 1):
        if len(order) < args.batch_size:
            order = list(rng.permutation(len(train))) + order
        x = training_images(rows([train[order.pop()] for _ in range(args.batch_size)]), cfg, rng, step=step)
        loss, _ = eq_vae_loss(vae, x, objective, generator=gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), RECIPE["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(vae)
    result = {"seed": seed}
    for name in ("last", "ema"):
        if name == "ema":
            vae.load_state_dict(ema.shadow)
        vae.eval()
        with torch.no_grad():
            result[f"{name}/psnr"] = round(psnr(reconstruct(vae, held_out), held_out), 2)
            for size in (64, 32):
                color, shape = accuracy(reconstructed(vae, clean_cases(size=size, per_scene=2)))
                result[f"{name}/color{size}"], result[f"{name}/shape{size}"] = round(color, 3), round(shape, 3)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--steps", type=int, default=RECIPE["steps"])
    ap.add_argument("--lr", type=float, default=RECIPE["lr"])
    ap.add_argument("--ema-decay", type=float, default=RECIPE["ema_decay"])
    ap.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    ap.add_argument("--crop-size", type=int, default=RECIPE["crop_size"])
    ap.add_argument("--whole-image-every", type=int, default=RECIPE.get("whole_image_every", 0),
                    help="every Nth step whole 64 px images instead of crops (0: never)")
    ap.add_argument("--norm-groups", type=int, default=8, help="GroupNorm groups of the tiny VAE (its config: 8)")
    args = ap.parse_args()
    print(json.dumps({"recipe": {k: v for k, v in vars(args).items() if k != "seeds"}}))
    with ProcessPoolExecutor(max_workers=2) as pool:
        for result in pool.map(draw, args.seeds, [args] * len(args.seeds)):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
