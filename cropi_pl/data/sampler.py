"""A resumable, rank-aware sampler over the current training subset."""

from __future__ import annotations

import random
from collections.abc import Iterator

from torch.utils.data import DistributedSampler


class SubsetBatchStream(DistributedSampler):
    """Yields this rank's share of a deterministic stream of global batches over ``subset``.

    Epoch ``e`` is a function of ``(seed, e)`` alone: shuffled passes over the subset, concatenated
    until ``num_batches`` global batches of ``global_batch_size`` prompts are filled. Rank ``r`` of
    ``world`` gets the ``r``-th contiguous slice of every global batch, so the union over ranks is
    the single-process batch. ``resume_from(epoch, batch)`` skips batches already trained on.

    It subclasses ``DistributedSampler`` only so that Lightning does not replace it with one.
    """

    def __init__(
        self,
        subset: list[int],
        global_batch_size: int,
        num_batches: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        if not subset:
            raise ValueError("the training subset is empty: nothing to sample")
        if global_batch_size % num_replicas:
            raise ValueError(
                f"batch_size={global_batch_size} prompts must divide over {num_replicas} ranks"
            )
        self.subset = list(subset)
        self.global_batch_size = global_batch_size
        self.num_batches = num_batches
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_from(self, epoch: int, batch: int) -> None:
        self._resume = (epoch, batch)

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches (pool indices), identical on every rank."""
        rng = random.Random(f"{self.seed}-{epoch}")
        needed = self.num_batches * self.global_batch_size
        stream: list[int] = []
        while len(stream) < needed:
            order = list(self.subset)
            rng.shuffle(order)
            stream.extend(order)
        g = self.global_batch_size
        return [stream[b * g : (b + 1) * g] for b in range(self.num_batches)]

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
        self._resume = None
        per_rank = self.global_batch_size // self.num_replicas
        lo = self.rank * per_rank
        for batch in self.global_batches(self.epoch)[start:]:
            yield from batch[lo : lo + per_rank]

    def __len__(self) -> int:
        return self.num_batches * (self.global_batch_size // self.num_replicas)
