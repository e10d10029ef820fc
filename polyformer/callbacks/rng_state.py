"""Random-number-generator states in the checkpoint, so a resumed run draws the same dropout masks (and in-process
augmentations) as one that never stopped. Lightning saves model, optimizer, scheduler, loops and data position,
but not the RNGs.

The states are stored as tensors, ints and lists (no numpy arrays, no tuples of objects), so checkpoints still load
with `torch.load(weights_only=True)`.

Which state: the one at the end of the last training batch. It is put back
- after validation inside fit, so the next batch's data augmentation (drawn when the batch is loaded, before any
  batch hook) sees the same state whether or not validation ran, and whether or not the run was resumed there;
- on resume, at `on_train_start`, i.e. before the first batch is loaded.
So a run resumed from a checkpoint draws the dropout masks, and the in-process augmentations, of the run that never
stopped. It is deliberately *not* put back before every batch: the batch has been loaded (and augmented) by then, so
rewinding would make every batch's augmentation start from the same state. Iterator start-up draws nothing from the
global generator because our loaders own one (`polyformer.data.loading`).

Only the state of the saving rank (rank 0) is written: Lightning seeds every rank alike (`seed_everything`), and the
ranks make the same draws in lockstep, so rank 0's state is every rank's state. Gathering per-rank states would need
a collective inside `state_dict()`, which SLURM's requeue signal handler calls asynchronously on each rank.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


def collect_rng_states() -> dict[str, Any]:
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
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    py = states["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = states["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"])
    )
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RNGState(Callback):
    """Stores torch / CUDA / numpy / python RNG states in each checkpoint and restores them on resume."""

    def __init__(self) -> None:
        self._states: dict[str, Any] | None = None  # at the end of the last training batch, or loaded on resume

    def state_dict(self) -> dict[str, Any]:
        return self._states if self._states is not None else collect_rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._states = state_dict

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
