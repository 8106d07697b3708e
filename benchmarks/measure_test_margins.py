"""The numbers behind the bounds of the tests that train: each case over several seeds and torch thread counts.

A test whose assertion depends on what training reached is only as good as the margin between its bound and
what training reaches on any machine. Thread counts change the order of float reductions, and so every
number after a few hundred steps; seeds stand in for the other differences between machines (kernel
choices, read order). Each case runs the test's own configuration (imported from the test module, so the
two cannot drift apart), prints one row per (seed, threads) and the min / max, and the test states them.

    .venv/bin/python benchmarks/measure_test_margins.py vae-job            # ~1 min per run on 2 cores
    .venv/bin/python benchmarks/measure_test_margins.py eqvae-unit --seeds 0 1 2 3 4 --threads 1 2

Cases:
- `vae-job`: tests/pipelines/test_vae_job.py::test_tiny_vae_from_scratch_via_ray_job_submit, held-out PSNR gain
  (dB) of the EQ-VAE job with the test's fields (JOB), on a local Ray cluster of 2 CPUs like the test's;
- `eq-term`: test_vae_job.py::test_equivariance_term_lowers_the_equivariance_error, after/eq_error with the EQ
  term on every batch vs never (the ratio must stay below 1);
- `eqvae-unit`: tests/hdm_model/test_eqvae.py::test_tiny_vae_learns_with_the_eq_objective, in this process;
- `train-stage`: tests/pipelines/test_train_stage.py::test_learning_two_caption_classes, final / first loss and
  final / predicting-zero loss.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def vae_job(seed: int, threads: int, work: Path) -> dict[str, float]:
    from mlflow import MlflowClient

    from pipelines.train.config import VAETrainConfig
    from pipelines.train.eqvae import run_vae_training
    from tests.pipelines.train.test_vae_job import JOB, write_images

    images = work / "images"
    if not images.exists():
        write_images(images)
    out = work / f"vae-{seed}-{threads}"
    config = VAETrainConfig(input=str(images), output=str(out), **{**JOB, "seed": seed, "torch_threads": threads},
                            tracking={"uri": f"sqlite:///{work}/mlflow.db", "experiment": "margins"})
    summary = run_vae_training(config)
    m = summary.metrics
    rec = [p.value for p in MlflowClient(config.tracking.uri).get_metric_history(summary.run_id, "train/rec")]
    return {"before/psnr": m["before/psnr"], "after/psnr": m["after/psnr"],
            "gain_db": m["after/psnr"] - m["before/psnr"], "rec_last/first": rec[-1] / rec[0]}


def eq_term(seed: int, threads: int, work: Path) -> dict[str, float]:
    from tests.pipelines.train.test_vae_job import eq_term_fields, write_images

    from pipelines.train.config import VAETrainConfig
    from pipelines.train.eqvae import run_vae_training

    images = work / "images"
    if not images.exists():
        write_images(images)
    after = {}
    for p_eq in (1.0, 0.0):
        fields = eq_term_fields(images, work, seed=seed, torch_threads=threads)
        config = VAETrainConfig(output=str(work / f"eq-{seed}-{threads}-{p_eq}"), p_eq=p_eq, **fields)
        after[p_eq] = run_vae_training(config).metrics["after/eq_error"]
    return {"eq_error_with": after[1.0], "eq_error_without": after[0.0], "ratio": after[1.0] / after[0.0]}


def eqvae_unit(seed: int, threads: int, work: Path) -> dict[str, float]:
    import torch

    from tests.hdm_model.test_eqvae import learn_eq_objective

    torch.set_num_threads(threads)
    r = learn_eq_objective(seed)
    return {"psnr_gain_db": r.psnr_after - r.psnr_before, "eq_ratio": r.eq_after / r.eq_before,
            "transformed": r.transformed}


def train_stage(seed: int, threads: int, work: Path) -> dict[str, float]:
    from tests.pipelines.train.test_train_stage import learn_two_caption_classes
    from tests.tiny_models import make_tiny_text_encoder, make_tiny_vae

    models = work / "models"
    te, vae = models / "te", models / "vae"
    if not models.exists():
        make_tiny_text_encoder(te)
        make_tiny_vae(vae)
    r = learn_two_caption_classes({"te": str(te), "vae": str(vae)}, work / f"stage-{seed}-{threads}",
                                  seed=seed, torch_threads=threads)
    return {"first": r.first, "last": r.last, "zero": r.zero_loss, "last/first": r.last / r.first,
            "last/zero": r.last / r.zero_loss}


CASES = {"vae-job": (vae_job, True), "eq-term": (eq_term, True), "eqvae-unit": (eqvae_unit, False),
         "train-stage": (train_stage, True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--address", help="a running Ray cluster (default: a local one of 2 CPUs, like the tests')")
    args = ap.parse_args()
    measure, needs_ray = CASES[args.case]
    if needs_ray:
        import ray

        ray.init(address=args.address, num_cpus=None if args.address else 2, include_dashboard=False,
                 log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hdm-margins-") as tmp:
        for threads in args.threads:
            for seed in args.seeds:
                row = measure(seed, threads, Path(tmp))
                rows.append((seed, threads, row))
                print(f"seed {seed} threads {threads}: " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()),
                      flush=True)
    print(f"\n{args.case}: {len(rows)} runs (seeds {args.seeds} x threads {args.threads})")
    for key in rows[0][2]:
        values = [r[key] for _, _, r in rows]
        print(f"  {key:>20}: min {min(values):.4f}  max {max(values):.4f}")


if __name__ == "__main__":
    main()
