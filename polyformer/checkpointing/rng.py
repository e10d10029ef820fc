"""Random-number-generator states in the checkpoint, so a resumed run draws the same dropout masks (and whatever
else the model draws: Mixup/CutMix in the training step) as one that never stopped. Lightning saves model,
optimizer, scheduler, loops and data position, but not the RNGs. Per-sample data augmentation does not depend on
these states at all: our loaders seed each sample from (seed, epoch, index) and give the global generators back
afterwards (`polyformer.data.loading.SeededSamples`), in worker processes or not.

The states are stored as tensors, ints and lists (no numpy arrays, no tuples of objects), so checkpoints still load
with `torch.load(weights_only=True)`.

Which state: the one at the end of the last training batch. It is put back
- after validation inside fit, so the next training step draws the same numbers whether or not validation ran, and
  whether or not the run was resumed there;
- on resume, at `on_train_start`, before the first batch.
It is deliberately *not* put back before every batch: that would make every batch draw the same numbers.

Every rank's states are written, one entry per rank: ranks do not draw in lockstep (translation batches differ in
length from rank to rank, so do their dropout masks), and each rank's CUDA generator is its own device's. A rank
saves the CPU torch, numpy and python states and the state of its *current* CUDA device only (the other devices
visible to it belong to other ranks and were never advanced here). `state_dict()` gathers the entries with
`all_gather_object`, a collective, when a process group of more than one rank is up. That is safe because every
save reaches it on every rank at the same point: Lightning's `ModelCheckpoint` calls `trainer.save_checkpoint` on
all ranks, and polyformer's `SlurmRequeue` saves the HPC checkpoint at an optimizer-step boundary that all ranks
agreed on (Lightning's own SIGUSR1 handler, which saved from inside the signal handler, is not used). On load each
rank restores its own entry; if the world size changed, every rank restores rank 0's entry and a warning says that
the resumed random stream differs from the one that never stopped. Checkpoints written before per-rank states (one
state dict, rank 0's) still load: every rank restores that state, as before.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collect_rng_states() -> dict[str, Any]:
    """This process's states: CPU torch, python, numpy, and its current CUDA device's (if CUDA is in use)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()  # the current device: the one this rank draws on
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put one process's states back; the CUDA state goes to the current device only."""
    torch.set_rng_state(states["torch"])
    py = states["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = states["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"])
    )
    cuda = states.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, (list, tuple)):
        # Old checkpoints hold rank 0's `get_rng_state_all()`, one state per device, of which only rank 0's own
        # device had been advanced. A single process resumes on the device it saved from; with several ranks,
        # rank 0's device was device 0 under Lightning's one-device-per-local-rank mapping.
        if not cuda:
            return
        _, world = _rank_and_world()
        index = torch.cuda.current_device() if world == 1 else 0
        cuda = cuda[index] if index < len(cuda) else cuda[0]
    torch.cuda.set_rng_state(cuda)  # default device "cuda": the current one


class RNGState(Callback):
    """Stores torch / CUDA / numpy / python RNG states of every rank in each checkpoint and restores each rank's own
    on resume."""

    def __init__(self) -> None:
        self._states: dict[str, Any] | None = None  # this rank's, at the end of the last training batch or loaded
        self._warned = False

    def state_dict(self) -> dict[str, Any]:
        local = self._states if self._states is not None else collect_rng_states()
        _, world = _rank_and_world()
        ranks: list[Any] = [None] * world
        if world > 1:
            # A collective: every rank is here at the same save (see the module docstring).
            dist.all_gather_object(ranks, local)
        else:
            ranks[0] = local
        return {"world_size": world, "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "ranks" not in state_dict:  # the old format: one state, rank 0's, restored on every rank as before
            self._states = state_dict
            return
        rank, world = _rank_and_world()
        saved_world = int(state_dict["world_size"])
        if saved_world == world:
            self._states = state_dict["ranks"][rank]
            return
        self._states = state_dict["ranks"][0]
        if not self._warned:
            self._warned = True
            rank_zero_warn(
                f"The checkpoint holds the RNG states of {saved_world} ranks but this run has {world}: every rank "
                "restores rank 0's states, so the resumed random stream (dropout, augmentation) differs from the "
                "one of the run that never stopped"
            )

    def _rewind(self) -> None:
        if self._states is not None:
            restore_rng_states(self._states)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rewind()  # resumed: before the first batch is loaded

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._states = collect_rng_states()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._rewind()  # as if validation had not run: the next batch loads with the same state either way
