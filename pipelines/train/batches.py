"""What a training stage's worker trains on: seeded draws, micro-batches of latents prepared ahead by a
background thread, and the resume of an epoch by the latent keys already trained in it."""

from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

# Randomness: every draw of training comes from an explicit generator, never from torch's global RNG (which
# seeds only the model's init, the same on every rank: DDP broadcasts rank 0's weights anyway). Two streams:
# - the step's draws (timesteps, noise, TREAD mask), made when a micro-batch runs, on the device: seeded by
#   (seed, rank, optimizer step, micro-step), so ranks differ and a resumed run draws what the uninterrupted
#   run drew from the same step on;
# - a sample's draws (posterior sample, crop offset, caption dropout), made by the prefetch thread AHEAD of
#   the step: seeded by (seed, epoch, latent key), not by rank or position, so they hold whatever the read
#   order, the worker count or the prefetch depth, and a resume with another worker count draws the same.
_STEP, _SAMPLE, _SHUFFLE = 0, 1, 2  # stream tags mixed into the seeds


def derive_seed(*words: int | str) -> int:
    """A 64-bit seed mixed from `words` by numpy's SeedSequence, strings through blake2b: the same in every
    process and Python version (unlike hash(), which is salted per process)."""
    entropy = [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") if isinstance(w, str)
               else w % 2**64 for w in words]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


def step_generator(*, seed: int, rank: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    """Timesteps, noise and TREAD mask of micro-step `micro` of optimizer step `step` on `rank`."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, _STEP, rank, step, micro))


def sample_generator(*, seed: int, epoch: int, key: str) -> torch.Generator:
    """Posterior sample, crop offset and caption dropout of the latent `key` in `epoch`."""
    return torch.Generator().manual_seed(derive_seed(seed, _SAMPLE, epoch, key))


@dataclass
class MicroBatch:
    latents: torch.Tensor  # (B, C, s, s) square crops
    positions: torch.Tensor  # (B, s*s, 2) their slices of the whole-image position maps
    aspect: torch.Tensor  # (B,) log(W / H) of the whole images
    captions: list[str]
    keys: list[str]  # latent keys: what a checkpoint records as trained
    tokens: Any = None  # hdm_model.text_encoder.Tokens of the captions, when the batcher tokenises

    def pin_memory(self) -> MicroBatch:
        """Pinned copies of the tensors (and tokens), so the step's `non_blocking` copies overlap the GPU's work."""
        return MicroBatch(latents=self.latents.pin_memory(), positions=self.positions.pin_memory(),
                          aspect=self.aspect.pin_memory(), captions=self.captions, keys=self.keys,
                          tokens=self.tokens.pin_memory() if self.tokens is not None else None)


class LatentBatcher:
    """Rows of the latent Parquet -> a MicroBatch: square crops, their positions, log aspect, captions; with
    `tokenize`, the captions' tokens too, and with `pin`, all of it in pinned memory (what the prefetch thread
    prepares, off the training thread)."""

    def __init__(self, *, caption_dropout: float, seed: int, tokenize: Callable[[list[str]], Any] | None = None,
                 pin: bool = False):
        self.caption_dropout, self.seed, self.tokenize, self.pin = caption_dropout, seed, tokenize, pin

    def __call__(self, batch: dict[str, np.ndarray], *, epoch: int) -> MicroBatch:
        from hdm_model import crop_latent

        latents, positions, captions = [], [], []
        for i, key in enumerate(batch["key"]):
            gen = sample_generator(seed=self.seed, epoch=epoch, key=str(key))
            shape = tuple(int(s) for s in batch["latent_shape"][i])
            z = torch.from_numpy(np.frombuffer(batch["latent"][i], np.float16).reshape(shape).astype(np.float32))
            std = batch["latent_std"][i] if "latent_std" in batch else None
            if std is not None:  # a fresh posterior sample, as HDM trains on .sample()
                s = torch.from_numpy(np.frombuffer(std, np.float16).reshape(shape).astype(np.float32))
                z = z + s * torch.randn(shape, generator=gen)
            crop, pos = crop_latent(z, generator=gen)
            latents.append(crop)
            positions.append(pos)
            dropped = float(torch.rand((), generator=gen)) < self.caption_dropout
            captions.append("" if dropped else str(batch["caption"][i]))
        aspect = torch.log(torch.as_tensor(batch["aspect"], dtype=torch.float32))
        out = MicroBatch(latents=torch.stack(latents), positions=torch.stack(positions), aspect=aspect,
                         captions=captions, keys=[str(k) for k in batch["key"]],
                         tokens=self.tokenize(captions) if self.tokenize is not None else None)
        return out.pin_memory() if self.pin else out


def blank_batch(*, channels: int, side: int) -> MicroBatch:
    """One zero latent with the empty caption: what a rank out of data trains on with weight 0 (ResumedEpoch)."""
    from hdm_model import crop_latent

    crop, pos = crop_latent(torch.zeros(channels, side, side), offset=(0, 0))
    return MicroBatch(latents=crop[None], positions=pos[None], aspect=torch.zeros(1), captions=[""], keys=[])


def without_keys(batches: Iterable[dict[str, np.ndarray]], *, drop: frozenset[str],
                 batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """`batches` less the rows whose key is in `drop`, regrouped into batches of `batch_size` rows in the
    order read; a smaller last batch is dropped."""
    pending: dict[str, np.ndarray] | None = None
    for batch in batches:
        keep = np.fromiter((str(k) not in drop for k in batch["key"]), dtype=bool, count=len(batch["key"]))
        rows = {name: column[keep] for name, column in batch.items()}
        pending = rows if pending is None else {k: np.concatenate([pending[k], rows[k]]) for k in rows}
        while len(pending["key"]) >= batch_size:
            yield {k: v[:batch_size] for k, v in pending.items()}
            pending = {k: v[batch_size:] for k, v in pending.items()}


END_OF_EPOCH = object()


class BatchPrefetcher:
    """The worker's shard as ready model inputs, prepared `depth` batches ahead by a background thread.

    The thread iterates epoch after epoch from `epoch`, runs `batcher(batch, epoch=...)` on each batch (fp16
    decode, posterior draw, crops) and queues the result, then END_OF_EPOCH. So the step does not wait when
    Ray Data starts an epoch (~0.1 s on CPU, much more on a busy node: a small set has an epoch every few
    steps) and the per-sample work overlaps the step. To resume within an epoch, its first epoch leaves out
    the rows whose key is in `done_keys` (what the checkpoint recorded as trained, by every rank), whatever
    the read order or worker count; that epoch may then hold fewer batches on one rank than on another.
    With `shuffle_buffer`, each epoch draws its batches from a buffer of that many rows, seeded by
    (`seed`, epoch): a new order every epoch. `next()` returns the next item and raises whatever the thread
    raised.
    """

    def __init__(self, shard, batcher: Callable[..., Any], *, batch_size: int, epoch: int = 0,
                 done_keys: frozenset[str] = frozenset(), shuffle_buffer: int = 0, seed: int = 0, depth: int = 4):
        self.shard, self.batcher, self.batch_size, self.done_keys = shard, batcher, batch_size, done_keys
        self.epoch, self.shuffle_buffer, self.seed = epoch, shuffle_buffer, seed
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._fill, name="batch-prefetch", daemon=True)
        self.thread.start()

    def next(self) -> Any:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self, wait_s: float = 0.0) -> None:
        """Stops the thread at its next batch, waiting up to `wait_s` for it to end (it is a daemon: one
        blocked in Ray Data, say on an epoch the other workers never start, dies with the worker)."""
        self.stopped.set()
        if wait_s:
            self.thread.join(wait_s)

    def _fill(self) -> None:
        try:
            drop, epoch = self.done_keys, self.epoch
            while not self.stopped.is_set():
                if not self._epoch(epoch, drop):
                    return
                drop, epoch = frozenset(), epoch + 1
        except BaseException as error:  # handed to the training loop, which raises it
            self._put(error)

    def _epoch(self, epoch: int, drop: frozenset[str]) -> bool:
        """Queues one epoch's batches and END_OF_EPOCH; False when stopped."""
        from pipelines.cluster import epoch_batches  # Ray Data; imported here so the step runs without Ray

        batches = epoch_batches(self.shard, batch_size=self.batch_size, shuffle_buffer=self.shuffle_buffer,
                                seed=derive_seed(self.seed, _SHUFFLE, epoch) % 2**32, prefetch_batches=2,
                                drop_last=not drop)
        if drop:
            batches = without_keys(batches, drop=drop, batch_size=self.batch_size)
        seen = 0
        for batch in batches:
            seen += 1
            if not self._put(self.batcher(batch, epoch=epoch)):
                return False
        if not seen and not drop:
            raise RuntimeError(f"no batch of {self.batch_size} latents in this worker's shard "
                               "(fewer rows than workers x batch size)")
        return self._put(END_OF_EPOCH)

    def _put(self, item: Any) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


class EpochKeys:
    """The latent keys trained in the current epoch: those a resumed checkpoint recorded, plus this rank's."""

    def __init__(self, done: frozenset[str] = frozenset()):
        self.done, self.mine = done, []

    def add(self, keys: list[str]) -> None:
        self.mine.extend(keys)

    def next_epoch(self) -> None:
        self.done, self.mine = frozenset(), []

    def gather(self) -> list[str]:
        """Every rank's keys, sorted, a key trained twice listed twice (a collective: every rank calls it)."""
        import torch.distributed as dist

        ranks = [self.mine]
        if dist.is_available() and dist.is_initialized():
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, self.mine)
        return sorted([*self.done, *(key for keys in ranks for key in keys)])


class ResumedEpoch:
    """Keeps DDP's ranks in step through an epoch resumed by keys, where one rank can hold more batches than
    another (DDP hangs unless every rank runs the same number of backward passes).

    Before each micro-batch the ranks count, by an all-reduce, how many still have one. None: the epoch ends
    on every rank. Some: a rank out of data trains on `blank` with loss weight 0, the others weigh their loss
    by world / count, so DDP's gradient mean is the mean over the real batches only, and every key left in
    the epoch is trained once. Used only in that epoch: the others are even (equal shards, drop_last).
    """

    def __init__(self, *, world: int, device: torch.device, blank: MicroBatch):
        self.world, self.device, self.blank = world, device, blank
        self.out = False  # this rank has taken its END_OF_EPOCH and waits for the others

    def next(self, data: BatchPrefetcher) -> tuple[Any, float]:
        """(MicroBatch or END_OF_EPOCH, loss weight)."""
        import torch.distributed as dist

        item = END_OF_EPOCH if self.out else data.next()
        have = torch.tensor([item is not END_OF_EPOCH], dtype=torch.int64, device=self.device)
        dist.all_reduce(have)
        count = int(have.item())
        if count == 0:
            return END_OF_EPOCH, 0.0
        if item is END_OF_EPOCH:
            self.out = True
            return self.blank, 0.0
        return item, self.world / count
