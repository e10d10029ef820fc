"""Random-number-generator states in the checkpoint, so a resumed run draws the same dropout masks and augmentations
as one that never stopped. Lightning saves model, optimizer, scheduler, loops and data position, but not the RNGs.

The states are stored as tensors, ints and lists (no numpy arrays, no tuples of objects), so checkpoints still load
with `torch.load(weights_only=True)`.

When to restore matters: between `fit` starting and the first training batch the resumed run creates data-loader
iterators, and each creation draws a seed from the global torch generator. The uninterrupted run made no such draws
after a mid-epoch checkpoint, so the states are put back at the first `on_train_batch_start` after the resume, i.e.
after the loader has drawn its seed and right before the first step. (At an epoch-boundary checkpoint the
uninterrupted run *does* draw once for the next epoch's loader; that draw is exact only if the training loader owns
its own `generator`, see docs/cluster.md.)

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
        self._pending: dict[str, Any] | None = None  # loaded from a checkpoint, not yet applied

    def state_dict(self) -> dict[str, Any]:
        return collect_rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            restore_rng_states(self._pending)
            self._pending = None
