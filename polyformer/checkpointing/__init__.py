"""Everything about checkpoints: what goes into them, how they are written and read, and how a run resumes.

A polyformer checkpoint is Lightning's (weights, optimizer and scheduler states, loop positions, callback states)
plus what these write into it:

- `polyformer` {format, task, hyper_parameters} and `hyper_parameters`: every task (`metadata.write_metadata`);
- `callbacks["RNGState"]`: the always-on `rng.RNGState` callback, every rank's random-generator states;
- `callbacks["ResumableCheckpoint{...}"]`: the presets' `resumable.ResumableCheckpoint` (Lightning's own state);
- `tokenizer`, `clip`, ...: a task, for what it keeps beside its weights;
- `config`, `wandb`: `polyformer.loggers.RunMetadata`, the resolved CLI config and the W&B run to continue.

Modules: `files` (weights-only reads, atomic file and directory writes, `CheckpointError`), `io` (Lightning's
CheckpointIO and the FSDP mixin on top of `files`), `metadata` (the format, what tasks write and check, upgrades of
older formats), `loading` (`load_task`), `resumable` (`ResumableCheckpoint`), `rng` (`RNGState`).

`RunMetadata` stays in `polyformer.loggers`: its checkpoint part is two keys, the rest of it (handing the stored
run id to a W&B run not started yet, renaming the checkpoint folder after it) is logger work on `WandbLogger`.

Nothing here imports `polyformer.tasks` at import time (tasks import `metadata`; `load_task` imports them lazily).
Lightning keys a callback's saved state by its class name, so `RNGState` and `ResumableCheckpoint` keep theirs.
"""

from polyformer.checkpointing.files import (
    CheckpointError,
    atomic_torch_save,
    load_checkpoint,
    read_checkpoint,
    remove_stale_temporaries,
    swap_into_place,
    write_directory_atomically,
)
from polyformer.checkpointing.io import AtomicCheckpointIO, AtomicShardedSaves, with_atomic_checkpoint_io
from polyformer.checkpointing.loading import build_from_hparams, load_task
from polyformer.checkpointing.metadata import (
    CHECKPOINT_FORMAT,
    check_compatible,
    flatten,
    to_primitive,
    upgrade,
    write_metadata,
)
from polyformer.checkpointing.resumable import ResumableCheckpoint
from polyformer.checkpointing.rng import RNGState, collect_rng_states, restore_rng_states

__all__ = [
    "CHECKPOINT_FORMAT",
    "AtomicCheckpointIO",
    "AtomicShardedSaves",
    "CheckpointError",
    "RNGState",
    "ResumableCheckpoint",
    "atomic_torch_save",
    "build_from_hparams",
    "check_compatible",
    "collect_rng_states",
    "flatten",
    "load_checkpoint",
    "load_task",
    "read_checkpoint",
    "remove_stale_temporaries",
    "restore_rng_states",
    "swap_into_place",
    "to_primitive",
    "upgrade",
    "with_atomic_checkpoint_io",
    "write_directory_atomically",
    "write_metadata",
]
