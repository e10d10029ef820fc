"""Lightning's side of our checkpoint files: the CheckpointIO plugin that every Trainer built by `PolyformerCLI` gets
(`with_atomic_checkpoint_io`), and the FSDP strategy mixin for sharded checkpoints. The file work itself (atomic
writes, weights-only reads) is in `polyformer.checkpointing.files`.

Sharded FSDP checkpoints (`state_dict_type: sharded`) are directories written by every rank, and Lightning's
FSDPStrategy writes them itself, into the target path, without a CheckpointIO: a save killed halfway would leave the
previous `last.ckpt/` with some shards new and some old or truncated. `AtomicShardedSaves` writes into a temporary
sibling directory `<name>.tmp-<pid of rank 0>` (all ranks), waits for every rank (barrier), and rank 0 swaps it into
place with `swap_into_place`. It is the mixin that does it for any FSDPStrategy subclass;
`polyformer.strategies.FSDPStrategy` (configs/trainer/fsdp.yaml) has it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.strategies.fsdp import _METADATA_FILENAME
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from polyformer.checkpointing.files import (
    CheckpointError,
    atomic_torch_save,
    fsync_dir,
    fsync_file,
    read_checkpoint,
    remove_path,
    remove_stale_temporaries,
    swap_into_place,
    temporary_path,
)
from polyformer.checkpointing.metadata import upgrade


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO with atomic, durable local saves and weights-only loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        if not _is_local_file_protocol(path):
            # Object stores (s3://, gs://) have no rename; Lightning's fsspec transaction uploads the whole file.
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if weights_only is False:
            rank_zero_warn("polyformer loads checkpoints with weights_only=True only; ignoring weights_only=False")
        if not _is_local_file_protocol(path):
            return upgrade(super().load_checkpoint(path, map_location=map_location, weights_only=True))
        checkpoint = read_checkpoint(path, map_location=map_location)
        if not isinstance(checkpoint, dict):
            raise CheckpointError(f"{path} is not a Lightning checkpoint (it holds a {type(checkpoint).__name__})")
        return upgrade(checkpoint)  # older polyformer formats: brought up to date before Lightning restores them


def with_atomic_checkpoint_io(plugins: Any) -> list[Any]:
    """The Trainer's `plugins` with AtomicCheckpointIO added, keeping whatever a preset or the user set.

    - no CheckpointIO given: ours is appended next to the others (precision, cluster environment, ...);
    - a wrapper such as AsyncCheckpointIO without an inner IO: ours goes inside it;
    - plain TorchCheckpointIO: replaced by ours (same file format, only the write is atomic);
    - any other CheckpointIO: kept (the user asked for it), with a warning that its saves may not be atomic.
    """
    if plugins is None:
        plugins = []
    elif not isinstance(plugins, (list, tuple)):
        plugins = [plugins]
    plugins = list(plugins)
    ios = [i for i, p in enumerate(plugins) if isinstance(p, CheckpointIO)]
    if not ios:
        return [*plugins, AtomicCheckpointIO()]
    for i in ios:
        io = plugins[i]
        if isinstance(io, _WrappingCheckpointIO):  # e.g. AsyncCheckpointIO: ours does the writing inside it
            if io.checkpoint_io is None:
                io.checkpoint_io = AtomicCheckpointIO()
            io = io.checkpoint_io
        elif type(io) is TorchCheckpointIO:
            plugins[i] = io = AtomicCheckpointIO()
        if not isinstance(io, AtomicCheckpointIO):
            rank_zero_warn(
                f"trainer.plugins sets {type(io).__name__}: polyformer's atomic checkpoint writes are not used, so a "
                "run killed while saving may leave a partial checkpoint"
            )
    return plugins


class AtomicShardedSaves:
    """Mixin for a Lightning FSDPStrategy (class AtomicX(AtomicShardedSaves, SomeFSDPStrategy)): sharded checkpoints
    replace the old directory as a whole.

    Local paths only; object-store paths (s3://, ...) and `state_dict_type: full` without a sharded directory at the
    target are saved by Lightning as before (full checkpoints go through the CheckpointIO, i.e. AtomicCheckpointIO).
    """

    _state_dict_type: str
    is_global_zero: bool
    broadcast: Callable[..., Any]
    barrier: Callable[..., None]

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        parent: Any = super()
        if storage_options is not None or not _is_local_file_protocol(filepath):
            parent.save_checkpoint(checkpoint, filepath, storage_options=storage_options)  # raises or uploads
            return
        target = Path(self.broadcast(filepath))
        if self._state_dict_type == "full" and not target.is_dir():
            parent.save_checkpoint(checkpoint, target)  # a file: AtomicCheckpointIO replaces it atomically
            return
        # A sharded directory, or a full file replacing one (Lightning would delete the directory first).
        tmp = Path(self.broadcast(temporary_path(target)))  # rank 0's pid names it: the same path on every rank
        if self.is_global_zero:
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(target)
            remove_path(tmp)  # an earlier save of this same process that raised
        self.barrier("AtomicShardedSaves.save_checkpoint:prepared")
        parent.save_checkpoint(checkpoint, tmp)  # every rank writes its shard; the DCP writer fsyncs its files
        if self.is_global_zero and tmp.is_dir():
            fsync_file(tmp / _METADATA_FILENAME)  # Lightning's meta.pt is a plain torch.save, never fsynced
            fsync_dir(tmp)
        self.barrier("AtomicShardedSaves.save_checkpoint:written")  # every shard is on disk before the swap
        if self.is_global_zero:
            swap_into_place(tmp, target)
        self.barrier("AtomicShardedSaves.save_checkpoint:swapped")

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        if _is_local_file_protocol(checkpoint_path):
            path = Path(self.broadcast(checkpoint_path))
            if self.is_global_zero:
                remove_stale_temporaries(path)  # a swap killed between its renames: the old directory comes back
            self.barrier("AtomicShardedSaves.load_checkpoint:recovered")
        parent: Any = super()
        return parent.load_checkpoint(checkpoint_path, weights_only=weights_only)
