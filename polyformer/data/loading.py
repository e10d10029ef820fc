"""Data loaders every data module uses: a training loader that resumes mid-epoch, and evaluation loaders that
visit each sample exactly once across ranks.

Both samplers subclass DistributedSampler so Lightning leaves them in place instead of swapping in its own,
and both read the rank and world size when iterated, after the process group exists.
Lightning saves `state_dict()` of a sized loader with the fit loop and calls `load_state_dict()` on resume;
sized loaders are not prefetched, so "batches yielded" is exactly "batches trained on".

Per-sample randomness (random crops, flips, a random caption) is seeded per sample: the training sampler yields
(index, sample_seed(seed, epoch, index)) keys and `SeededSamples` seeds torch's, python's and numpy's global
generators with that seed around each sample. A sample's draws are then the same whichever worker loads it, however
many workers there are, whether they persist across epochs, and wherever the epoch was resumed; seeding workers
instead (DataLoader's base seed) cannot give that, since the assignment of batches to workers shifts on resume and
persistent workers are never reseeded. The generators' states are restored after each batch, so loading in the main
process leaves the stream that dropout draws from alone. Cost: about 10 us per sample (seeding three generators,
plus the key in the sampler), beside hundreds of microseconds for even an 8x8 crop.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def world_and_rank() -> tuple[int, int]:
    """(world size, rank), or (1, 0) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64's finaliser (Steele et al. 2014): a bijection of 64-bit integers whose output bits each depend on
    every input bit, so neighbouring inputs (index i, i + 1) give unrelated outputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 63-bit seed of sample `index` in `epoch` of a loader seeded with `seed`: SplitMix64 applied to seed, then
    to that xor epoch, then to that xor index (each reduced to 64 bits, so negative values work). For a given seed
    and epoch distinct indices get distinct 64-bit values; the top bit is dropped so the seed is a non-negative
    int64. Checkpoints resume with the augmentations they started with only while this function is unchanged."""
    x = _splitmix64(seed & _MASK64)
    x = _splitmix64(x ^ (epoch & _MASK64))
    return _splitmix64(x ^ (index & _MASK64)) >> 1


def _keyed(item: int | list[int], seed: int, epoch: int) -> tuple[int, int] | list[tuple[int, int]]:
    if isinstance(item, list):  # a whole batch (BucketBatchSampler): a key per sample
        return [(i, sample_seed(seed, epoch, i)) for i in item]
    return item, sample_seed(seed, epoch, item)


class EpochSampler(DistributedSampler):
    """A sampler whose epoch is advanced by its `ResumableLoader`, and whose first `skip` items of an epoch are
    dropped on resume. Lightning's `set_epoch` is ignored: when a run stops on max_steps, Lightning counts the epoch
    as finished and would move to the next one while the checkpointed position still points into this one.

    Subclasses give `epoch_items()`: this rank's indices (or whole batches of indices) of the current epoch, in order.
    Iterated, it yields them, or, once a `ResumableLoader` has set `seeded`, (index, sample seed) keys in their place
    (lists of keys for batches), which the loader's `SeededSamples` reads."""

    skip = 0  # items of this epoch already consumed
    seeded = False  # set by ResumableLoader: yield (index, sample_seed) keys instead of indices

    def set_epoch(self, epoch: int) -> None:
        pass

    def epoch_items(self) -> Sequence[int] | Sequence[list[int]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        # A generator, so `skip` is used up when iteration starts, not when iter() is called: a worker-backed
        # DataLoader iterator calls iter() twice when it starts (in __init__ and in _reset) and reads only the
        # second; consuming skip in the first would replay the whole epoch on resume (batch samplers, which
        # DataLoader does not wrap in its own lazy BatchSampler, met exactly that).
        items, seed, epoch = self.epoch_items()[self.skip :], self.seed, self.epoch
        self.skip = 0
        if not self.seeded:
            yield from items
            return
        for item in items:
            yield _keyed(item, seed, epoch)


class ResumableSampler(EpochSampler):
    """Seeded shuffle per epoch (or sequential), sharded by rank, equal length on every rank, skippable start."""

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=seed, drop_last=True)

    def epoch_items(self) -> list[int]:
        world, rank = world_and_rank()
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        per_rank = n // world  # drop the remainder so every rank takes the same number of steps
        return order[rank * per_rank : (rank + 1) * per_rank] if not self.shuffle else order[rank::world][:per_rank]

    def __len__(self) -> int:
        return len(self.dataset) // world_and_rank()[0]  # type: ignore[arg-type]


class _GlobalRNGsKept:
    """Saves torch's CPU, python's and numpy's global generator states on entry and puts them back on exit (also
    when a sample raises). Once per batch: numpy's get_state/set_state alone cost about 100 us."""

    def __enter__(self) -> None:
        self.states = torch.get_rng_state(), random.getstate(), np.random.get_state()

    def __exit__(self, *exc: object) -> None:
        torch_state, python_state, numpy_state = self.states
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def seed_global_rngs(seed: int) -> None:
    """Seeds the generators an augmentation draws from: torch's CPU generator (torchvision's transforms), python's
    `random` and numpy's legacy global. Each gets other bits of the seed: python's and numpy's MT19937 seeded with
    one value would draw the same numbers. torch.default_generator, not torch.manual_seed, which would also reseed
    the CUDA generators that dropout draws from."""
    torch.default_generator.manual_seed(seed)  # torch keeps the low 32 bits
    random.seed(seed)  # all 63 bits (a different initialisation than torch's, so no shared stream)
    np.random.seed(seed >> 31)  # the high 32 bits


class SeededSamples(Dataset):
    """`dataset` read with (index, seed) keys: each sample is loaded with the global generators seeded by its seed,
    which are restored afterwards, so loading in the main process (num_workers=0) leaves the stream dropout draws
    from where it was. A list of keys (a batch sampler's batch) gives the list of samples, as ParallelDataset
    answers a list of indices; a plain index (a sampler Lightning swapped in, e.g. for overfit_batches) is passed
    through unseeded. Draws made on a GPU inside a sample are not covered."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, list):
            return self.__getitems__(key)
        if isinstance(key, tuple):
            return self.__getitems__([key])[0]
        return self.dataset[key]

    def __getitems__(self, keys: list[Any]) -> list[Any]:
        # DataLoader hands a whole batch of keys here, so the states are saved and restored once per batch.
        out = []
        with _GlobalRNGsKept():
            for key in keys:
                if isinstance(key, tuple):
                    index, seed = key
                    seed_global_rngs(seed)
                    out.append(self.dataset[index])
                else:
                    out.append(self.dataset[key])
        return out


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
    """A training DataLoader whose position within the epoch is part of the checkpoint, and whose samples draw their
    randomness from (seed, epoch, index) alone (see the module docstring), so a resumed epoch loads what the
    uninterrupted one loaded with any number of workers.

    Give `batch_size` to batch a `ResumableSampler` over `dataset`, or `batch_size=None` and an `EpochSampler`
    that yields whole batches (e.g. length buckets). Sample seeds use the sampler's seed. `self.dataset` is the
    `SeededSamples` around `dataset`."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int | None,
        shuffle: bool = True,
        seed: int = 0,
        sampler: EpochSampler | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(dataset, SeededSamples):  # Lightning re-instantiating a loader passes its .dataset back
            dataset = dataset.dataset
        if sampler is None:
            sampler = ResumableSampler(dataset, shuffle, seed)
            kwargs["drop_last"] = True
        sampler.seeded = True
        # Own generator: creating an iterator then never draws from the global RNG, which resume must replay.
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(SeededSamples(dataset), batch_size=batch_size, sampler=sampler, **kwargs)
        self.batches_done = 0

    def __iter__(self):  # type: ignore[override]
        sampler: EpochSampler = self.sampler  # type: ignore[assignment]
        if self.batches_done >= len(self):  # Lightning stops after len() batches without exhausting this generator
            self.batches_done = 0
            sampler.epoch += 1
        sampler.skip = self.batches_done * (self.batch_size or 1)
        # The workers' base seeds reach only draws made outside a sample (worker_init_fn, collate_fn); seeded by
        # the epoch so they too are reproducible. Samples are seeded by SeededSamples.
        self.generator.manual_seed(sampler.seed + 1_000_003 * sampler.epoch)
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
