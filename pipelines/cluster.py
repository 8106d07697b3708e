"""Sizing Ray Train worker groups against the cluster they run on."""

from __future__ import annotations

import ray


def scaling(workers: int | None, use_gpu: bool | None):
    """A `ScalingConfig`: `use_gpu` None means "when the cluster has GPUs"; `workers` None means 4 with
    GPUs, else 2. CPU workers ask for at most (CPUs - 1) / workers each, so Ray Data's read and
    preprocessing tasks keep a CPU: workers that take every CPU starve their own input and hang."""
    from ray.train import ScalingConfig

    resources = ray.cluster_resources()
    gpu = use_gpu if use_gpu is not None else resources.get("GPU", 0) > 0
    n = workers or (4 if gpu else 2)
    cpus = 1.0 if gpu else min(1.0, max(0.25, (resources.get("CPU", 1) - 1) / n))
    return ScalingConfig(num_workers=n, use_gpu=gpu, resources_per_worker={"CPU": cpus})
