"""Sizing work against the node it runs on (Ray Train worker groups, torch threads of CPU workers), and how a
training worker reads its shard."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import ray


def connect() -> None:
    """Join the Ray cluster this process runs on (a job's driver: RAY_ADDRESS or the local head node)."""
    ray.init()


# How a stage's workers are placed on the cluster's nodes (TrainStageConfig.placement): packed onto as few nodes
# as fit them (one 4-GPU node: every worker on it), spread over nodes where resources allow, or strictly one per
# node (a stage that must span nodes; it waits until that many nodes have room)
PLACEMENT = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}


def scaling(workers: int | None, use_gpu: bool | None, *, placement: str = "pack"):
    """A `ScalingConfig`: `use_gpu` None means "when the cluster has GPUs"; `workers` None means 4 with
    GPUs, else 2. CPU workers ask for at most (CPUs - 1) / workers each, so Ray Data's read and
    preprocessing tasks keep a CPU: workers that take every CPU starve their own input and hang. `placement`:
    a key of PLACEMENT."""
    from ray.train import ScalingConfig

    resources = ray.cluster_resources()
    gpu = use_gpu if use_gpu is not None else resources.get("GPU", 0) > 0
    n = workers or (4 if gpu else 2)
    cpus = 1.0 if gpu else min(1.0, max(0.25, (resources.get("CPU", 1) - 1) / n))
    return ScalingConfig(num_workers=n, use_gpu=gpu, resources_per_worker={"CPU": cpus},
                         placement_strategy=PLACEMENT[placement])


def cpu_threads(workers_on_node: int, threads: int | None = None, *, leave: int = 0) -> int:
    """torch threads for one of `workers_on_node` CPU workers: `threads`, else its share of the node's cores
    after `leave` of them. Ray starts a worker with OMP_NUM_THREADS set to its CPU request (1, or less than 1
    rounded up), so a lone worker on a 2-core node would otherwise compute on one core and leave the other idle.
    """
    return threads or max(1, ((os.cpu_count() or 1) - leave) // max(1, workers_on_node))


def cpu_marks() -> tuple[float, float, float] | None:
    """(monotonic seconds, CPU-seconds the whole node has been busy, CPU-seconds of this process), or None where
    /proc/stat is missing (not Linux)."""
    try:
        fields = Path("/proc/stat").read_text().split(maxsplit=9)[1:9]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields)
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return time.monotonic(), busy, time.process_time()


class CoreShare:
    """torch threads for one of several CPU workers sharing a node, chosen anew before each piece of work: the
    cores that the rest of the node left idle since the last choice (this process's own CPU time discounted),
    rounded, between 1 and the node's cores. N busy encoders settle at about cores / N threads each; one left
    alone (the others out of work at the end of a job, or waiting for input) takes the idle cores instead of
    finishing on its share, and gives them back once the others are busy again. Other people's load on the
    node counts as busy. Before the first choice, and where /proc/stat is unreadable: `start`."""

    def __init__(self, start: int, *, marks: Callable[[], tuple[float, float, float] | None] = cpu_marks,
                 cores: int | None = None, min_interval_s: float = 1.0):
        self.threads, self.cores = start, cores or os.cpu_count() or 1
        self.marks, self.min_interval_s = marks, min_interval_s
        self.last = marks()

    def update(self) -> int:
        now = self.marks()
        if now is None or self.last is None or now[0] - self.last[0] < self.min_interval_s:
            return self.threads  # too short a window to tell: keep the count
        wall, busy, mine = (a - b for a, b in zip(now, self.last))
        idle = self.cores - max(0.0, busy - mine) / wall
        self.threads, self.last = min(self.cores, max(1, int(idle + 0.5))), now
        return self.threads


# Training workers leave one core to Ray's own processes and the dataset reader: in the demo's stages on 2 cores
# (Ray jobs, one worker) one thread ran the VAE at 5.0 steps/s against 4.3 with two, the 64 px XUT at 172-184
# samples/s against 134-187, although the bare step is 1.15-1.33x faster on two (benchmarks/bench_threads.py).
_TRAIN_LEAVE_CORES = 1


def set_train_threads(device, workers_on_node: int, threads: int | None) -> None:
    """torch threads of a Ray Train worker on CPU (`threads`, else `cpu_threads` after one core left to Ray);
    GPU workers keep Ray's setting."""
    if device.type == "cpu":
        import torch

        torch.set_num_threads(cpu_threads(workers_on_node, threads, leave=_TRAIN_LEAVE_CORES))


def epoch_batches(shard, *, batch_size: int, shuffle_buffer: int, seed: int, drop_last: bool = True, **options):
    """One epoch of a worker's dataset shard as numpy batches (the last, smaller one dropped unless `drop_last`
    is False). With `shuffle_buffer`, batches are drawn from a buffer of that many rows with `seed`: give each
    epoch its own seed for a new order."""
    shuffle = dict(local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=seed) if shuffle_buffer else {}
    return shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last, **shuffle, **options)
