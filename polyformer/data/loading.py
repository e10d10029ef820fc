"""Data loaders every data module uses: a training loader that resumes mid-epoch, and evaluation loaders that
visit each sample exactly once across ranks.

Both samplers subclass DistributedSampler so Lightning leaves them in place instead of swapping in its own,
and both read the rank and world size when iterated, after the process group exists.
Lightning saves `state_dict()` of a sized loader with the fit loop and calls `load_state_dict()` on resume;
sized loaders are not prefetched, so "batches yielded" is exactly "batches trained on".
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def world_and_rank() -> tuple[int, int]:
    """(world size, rank), or (1, 0) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class EpochSampler(DistributedSampler):
    """A sampler whose epoch is advanced by its `ResumableLoader`, and whose first `skip` items of an epoch are
    dropped on resume. Lightning's `set_epoch` is ignored: when a run stops on max_steps, Lightning counts the epoch
    as finished and would move to the next one while the checkpointed position still points into this one."""

    skip = 0  # items of this epoch already consumed

    def set_epoch(self, epoch: int) -> None:
        pass


class ResumableSampler(EpochSampler):
    """Seeded shuffle per epoch (or sequential), sharded by rank, equal length on every rank, skippable start."""

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=seed, drop_last=True)

    def _indices(self) -> list[int]:
        world, rank = world_and_rank()
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        per_rank = n // world  # drop the remainder so every rank takes the same number of steps
        return order[rank * per_rank : (rank + 1) * per_rank] if not self.shuffle else order[rank::world][:per_rank]

    def __iter__(self) -> Iterator[int]:
        indices = self._indices()[self.skip :]
        self.skip = 0
        return iter(indices)

    def __len__(self) -> int:
        return len(self.dataset) // world_and_rank()[0]  # type: ignore[arg-type]


class EvalSampler(DistributedSampler):
    """Rank r takes samples r, r + world, ...: no padding, so nothing is counted twice (ranks may differ by one)."""

    def __init__(self, dataset: Dataset) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        world, rank = world_and_rank()
        return iter(range(rank, len(self.dataset), world))  # type: ignore[arg-type]

    def __len__(self) -> int:
        world, rank = world_and_rank()
        return len(range(rank, len(self.dataset), world))  # type: ignore[arg-type]


class ResumableLoader(DataLoader):
    """A training DataLoader whose position within the epoch is part of the checkpoint.

    Give `batch_size` to batch a `ResumableSampler` over `dataset`, or `batch_size=None` and an `EpochSampler`
    that yields whole batches (e.g. length buckets)."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int | None,
        shuffle: bool = True,
        seed: int = 0,
        sampler: EpochSampler | None = None,
        **kwargs: Any,
    ) -> None:
        if sampler is None:
            sampler = ResumableSampler(dataset, shuffle, seed)
            kwargs["drop_last"] = True
        # Own generator: creating an iterator then never draws from the global RNG, which resume must replay.
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.batches_done = 0

    def __iter__(self):  # type: ignore[override]
        sampler: EpochSampler = self.sampler  # type: ignore[assignment]
        if self.batches_done >= len(self):  # Lightning stops after len() batches without exhausting this generator
            self.batches_done = 0
            sampler.epoch += 1
        sampler.skip = self.batches_done * (self.batch_size or 1)
        # Worker seeds follow the position, so a resumed epoch augments as the uninterrupted one would.
        self.generator.manual_seed(sampler.seed + 1_000_003 * sampler.epoch + self.batches_done)
        for batch in super().__iter__():
            self.batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_done": self.batches_done}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.epoch = state["epoch"]  # type: ignore[attr-defined]
        self.batches_done = state["batches_done"]


def eval_loader(dataset: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))  # leave the global RNG alone (see above)
    return DataLoader(dataset, batch_size=batch_size, sampler=EvalSampler(dataset), **kwargs)
